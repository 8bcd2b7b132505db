"""Frechet distance between Gaussians fitted to two feature sets: the FID formula, for any
feature extractor (a world's classifier, Inception, CLIP)."""
from __future__ import annotations

import numpy as np


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                                sigma_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two Gaussians.

    tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): the right side is symmetric PSD, so
    eigenvalues give it exactly, without scipy's general sqrtm or its complex round-off.
    """
    root_a = _sqrtm_psd(sigma_a)
    cross = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.sqrt(
        np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features (N, D), in float64."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    if np.shape(feats_a)[-1] != np.shape(feats_b)[-1]:
        raise ValueError(f"feature sets differ in width: {np.shape(feats_a)} vs {np.shape(feats_b)}")
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))
