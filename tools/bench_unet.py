"""SD 1.5-size UNet forward: lcm-jax (jit) vs diffusers PyTorch on the same random weights.

    python tools/bench_unet.py --sizes 32 64 --repeats 3 --attention auto

Builds the diffusers UNet (fp32, time_cond_proj_dim=256 as an LCM student), saves it, loads it
with `lcm_jax.convert.unet.load_unet`, checks that both give the same output, and prints seconds
per forward (median after a warmup), GFLOP/s and the ratio torch/jax, one row per latent size.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
    time_cond_proj_dim=256)
# Forward cost at batch 1 (multiply-adds x 2), counted for SD 1.5 with 77 text tokens.
GFLOP = {32: 172.0, 64: 677.0}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _median_time(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        _log(f"  run {i + 1}/{repeats}: {times[-1]:.2f} s")
    return statistics.median(times)


def _inputs(size: int) -> dict:
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((1, 4, size, size), np.float32),
            "timesteps": np.array([759.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 768), np.float32),
            "timestep_cond": rng.standard_normal((1, 256), np.float32)}


def bench_torch(folder: str, sizes, repeats: int) -> tuple[dict, dict]:
    """Seconds per forward and outputs (NHWC) of the diffusers UNet, under inference_mode."""
    import torch
    from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel.from_pretrained(folder).eval()
    seconds, outputs = {}, {}
    for size in sizes:
        x = {k: torch.from_numpy(v) for k, v in _inputs(size).items()}
        x["timestep"] = x.pop("timesteps")
        with torch.inference_mode():
            _log(f"torch {size}x{size}: warmup")
            outputs[size] = model(**x).sample.numpy().transpose(0, 2, 3, 1)
            seconds[size] = _median_time(lambda: model(**x), repeats)
    return seconds, outputs


def bench_jax(folder: str, sizes, repeats: int, attention: str) -> tuple[dict, dict]:
    """Seconds per jitted forward and outputs of the lcm-jax UNet."""
    import jax
    from lcm_jax.convert.unet import load_unet
    module, params = load_unet(folder)
    module = module.clone(attention=attention)
    forward = jax.jit(lambda p, x: module.apply({"params": p}, **x))
    seconds, outputs = {}, {}
    for size in sizes:
        x = _inputs(size)
        x["sample"] = x["sample"].transpose(0, 2, 3, 1)
        _log(f"jax {size}x{size}: compile + warmup")
        outputs[size] = np.asarray(forward(params, x))
        seconds[size] = _median_time(lambda: forward(params, x).block_until_ready(), repeats)
    return seconds, outputs


def _save_random_unet(folder: str, seed: int = 0) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    UNet2DConditionModel(**SD15_UNET).save_pretrained(folder)


def _table(sizes, t_torch: dict, t_jax: dict, err: dict, attention: str) -> str:
    rows = [f"SD 1.5 UNet forward, fp32, batch 1 (attention={attention})",
            f"{'latent':>8} {'GFLOP':>6} {'torch s':>8} {'GFLOP/s':>8} {'jax s':>8} {'GFLOP/s':>8} "
            f"{'torch/jax':>9} {'max rel err':>11}"]
    for s in sizes:
        g = GFLOP.get(s)
        tt, tj = t_torch.get(s, float("nan")), t_jax[s]
        rate = lambda t: f"{g / t:8.1f}" if g else f"{'-':>8}"
        rows.append(f"{s:>5}x{s:<2} {g or '-':>6} {tt:8.2f} {rate(tt)} {tj:8.2f} {rate(tj)} "
                    f"{tt / tj:9.2f} {err.get(s, float('nan')):11.2e}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size (median)")
    parser.add_argument("--attention", default="auto",
                        choices=["auto", "xla", "chunked", "blocked", "cudnn"],
                        help="the UNet's attention implementation (layers.ATTENTION_IMPLEMENTATIONS)")
    parser.add_argument("--skip-torch", action="store_true", help="time lcm-jax only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        _log("building and saving a random SD 1.5 UNet (fp32, ~3.4 GB)")
        _save_random_unet(folder)
        t_torch, y_torch = ({}, {}) if args.skip_torch else bench_torch(folder, args.sizes, args.repeats)
        gc.collect()
        t_jax, y_jax = bench_jax(folder, args.sizes, args.repeats, args.attention)
    err = {s: float(np.abs(y_jax[s] - y_torch[s]).max() / np.abs(y_torch[s]).max()) for s in y_torch}
    print(_table(args.sizes, t_torch, t_jax, err, args.attention), flush=True)


if __name__ == "__main__":
    main()
