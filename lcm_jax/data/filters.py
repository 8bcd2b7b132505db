"""Sample filters on metadata, applied when a source builds its index.

`data.filters` is a string of comma-separated clauses `FIELD>=VALUE` or `FIELD<=VALUE` (e.g.
"aesthetic>=5.0,punsafe<=0.5"): a plain string survives ml_collections overrides
(`--config.data.filters=...`) and the JSON round-trip of config.json unchanged. A sample missing a
filtered field is rejected by that filter. `data.min_size` (shorter side) and
`data.max_aspect_ratio` read the metadata size: original_height/original_width, else
height/width.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from lcm_jax.data.transforms import aspect_ratio

_CLAUSE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Filter:
    name: str                                   # as printed in reports, e.g. 'aesthetic>=5.0'
    fields: tuple[str, ...]                     # metadata fields it reads

    def keep(self, meta: Mapping[str, Any]) -> Optional[bool]:
        """True/False, or None when the metadata lacks the field(s)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Threshold(Filter):
    op: str = ">="
    value: float = 0.0

    def keep(self, meta):
        v = _number(meta.get(self.fields[0]))
        if v is None:
            return None
        return v >= self.value if self.op == ">=" else v <= self.value


@dataclasses.dataclass(frozen=True)
class SizeFilter(Filter):
    min_size: int = 0
    max_aspect_ratio: float = 0.0

    def keep(self, meta):
        hw = metadata_size(meta)
        if hw is None:
            return True   # no size metadata: ImageTransform checks the decoded image
        if self.min_size:
            return min(hw) >= self.min_size
        return aspect_ratio(*hw) <= self.max_aspect_ratio


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if np.isnan(v) else float(v)


def metadata_size(meta: Mapping[str, Any]) -> Optional[tuple[int, int]]:
    """(height, width) of the original image from metadata, or None."""
    for h, w in (("original_height", "original_width"), ("height", "width")):
        hv, wv = _number(meta.get(h)), _number(meta.get(w))
        if hv and wv:
            return int(hv), int(wv)
    return None


def parse_filters(spec: str) -> list[Threshold]:
    """Threshold filters of a `data.filters` string; a bad clause raises naming it."""
    out = []
    for clause in filter(str.strip, (spec or "").split(",")):
        m = _CLAUSE.match(clause)
        if not m:
            raise ValueError(f"data.filters clause {clause!r}: write FIELD>=NUMBER or FIELD<=NUMBER, "
                             "comma-separated (e.g. 'aesthetic>=5.0,punsafe<=0.5')")
        field, op, value = m.groups()
        out.append(Threshold(f"{field}{op}{value}", (field,), op, float(value)))
    return out


def metadata_filters(data_cfg, size_from_metadata: bool = True) -> list[Filter]:
    """Every index-time filter of a config's data section. With size_from_metadata=False the size
    checks are left to decode time (ImageTransform), for sources without size metadata."""
    fs: list[Filter] = list(parse_filters(data_cfg.get("filters", "")))
    if size_from_metadata and data_cfg.get("min_size", 0):
        fs.append(SizeFilter(f"min_size={data_cfg.min_size}", (), min_size=int(data_cfg.min_size)))
    if size_from_metadata and data_cfg.get("max_aspect_ratio", 0):
        fs.append(SizeFilter(f"max_aspect_ratio={data_cfg.max_aspect_ratio}", (),
                             max_aspect_ratio=float(data_cfg.max_aspect_ratio)))
    return fs


@dataclasses.dataclass
class FilterReport:
    total: int
    rejected: dict[str, int]        # filter name -> samples it rejects (each counted on its own)
    missing: dict[str, int]         # filter name -> of those, samples without the field
    kept: int

    def line(self) -> str:
        parts = [f"{n} rejected {r}" + (f" ({self.missing[n]} without the field)" if self.missing[n] else "")
                 for n, r in self.rejected.items()]
        return f"{self.total} indexed, {self.kept} kept" + "".join(f"; {p}" for p in parts)


def apply_filters(metas: Sequence[Mapping[str, Any]], fs: Sequence[Filter],
                  name: str) -> tuple[np.ndarray, FilterReport]:
    """Indices of `metas` every filter keeps, and the report. Zero kept raises one ValueError
    line naming `name` (the source path), each filter and how many samples it rejected."""
    keep = np.ones(len(metas), bool)
    rejected, missing = {}, {}
    for f in fs:
        verdict = [f.keep(m) for m in metas]
        ok = np.array([v is True for v in verdict], bool)
        rejected[f.name] = int((~ok).sum())
        missing[f.name] = sum(v is None for v in verdict)
        keep &= ok
    report = FilterReport(len(metas), rejected, missing, int(keep.sum()))
    if not report.kept:
        raise ValueError(f"{name} yields no samples: {report.line()}; check the path or relax "
                         "data.filters / data.min_size / data.max_aspect_ratio")
    return np.flatnonzero(keep), report
