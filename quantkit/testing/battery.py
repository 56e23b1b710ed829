"""The fixed battery of weights ``check_quantizer`` runs: each case aims at one known bug.

Every case is deterministic (seeded numpy), small (at most 65,536 elements) and built in
float32, then cast to the input dtype; the checker compares against the cast values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import reference as R
from .conventions import BLOCK

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Case:
    name: str                  # what the case is for, e.g. "all-zero rows"
    x: torch.Tensor            # the 2-D input
    sqnr_floor: float | None   # dB the round trip must reach (None: the values are not weight-like)

    @property
    def label(self) -> str:
        rows, cols = self.x.shape
        return f"case '{self.name}' ({str(self.x.dtype).removeprefix('torch.')} [{rows}, {cols}])"


def _gaussian(rows, cols, std=0.02, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * std).astype(np.float32)


def _mixed_rows(rows=200, cols=300) -> np.ndarray:
    # Rows four decades apart: a per-channel or per-block quantizer must keep each row's precision.
    rng = np.random.default_rng(1)
    return (_gaussian(rows, cols, 1.0, 1) * 10.0 ** rng.uniform(-3, 1, size=(rows, 1))).astype(np.float32)


def _outliers(rows=128, cols=256) -> np.ndarray:
    x = _gaussian(rows, cols, 0.02, 2)
    hit = np.random.default_rng(2).random(x.shape) < 0.002
    x[hit] *= 100.0
    return x


def _ties_at_scale_one() -> np.ndarray:
    """Every E4M3 value, every midpoint between neighbours and the float32 on either side, in
    rows that each start with 448: every row, tile and tensor has absmax 448, so scale = 1 and
    x / scale is x exactly, and each rounding decision is tested (ties must go to even)."""
    points = R.neighbours_of_midpoints(R.E4M3FN)
    points = points[np.abs(points) <= 448.0]
    width = 63
    points = np.concatenate([points, np.zeros(-len(points) % width, np.float32)])
    body = points.reshape(-1, width)
    return np.concatenate([np.full((body.shape[0], 1), 448.0, np.float32), body], axis=1)


def _every_pattern(dtype: torch.dtype) -> np.ndarray:
    """All 65,536 bit patterns of the input dtype (fp16's own; bf16's for bf16 and fp32), NaN
    and inf replaced by 0, as [256, 256] with one high byte per row: per-channel scales span
    the whole exponent range."""
    x = R.all_fp16_as_float32() if dtype is torch.float16 else R.all_bf16_as_float32()
    return np.where(np.isfinite(x), x, np.float32(0)).reshape(256, 256)


def _subnormal_range(rows=96, cols=160) -> np.ndarray:
    """Magnitudes spread over 2^-20 .. 1 of the absmax: many x / scale land among FP8's
    subnormals (below 2^-6) or round to zero."""
    rng = np.random.default_rng(3)
    x = np.exp2(rng.uniform(-20, 0, size=(rows, cols))) * rng.choice([-1.0, 1.0], size=(rows, cols))
    x[:, 0] = 1.0
    return x.astype(np.float32)


def _tiny(rows=64, cols=200) -> np.ndarray:
    # absmax 1e-5: scale ~2.2e-8, below float16's smallest subnormal (6e-8): float16 scales are 0.
    return _gaussian(rows, cols, 2.5e-6, 4)


def _zero_rows(rows=40, cols=200) -> np.ndarray:
    x = _gaussian(rows, cols, 0.02, 5)
    x[[0, 7, rows - 1]] = 0.0
    x[3] = -0.0
    return x


def _zero_tiles(rows=256, cols=300) -> np.ndarray:
    x = _gaussian(rows, cols, 0.02, 6)
    x[:BLOCK, BLOCK:2 * BLOCK] = 0.0          # a whole tile
    x[BLOCK:, 2 * BLOCK:] = 0.0               # the bottom-right edge tile (128 x 44)
    return x


_CASES: list[tuple[str, Callable[[torch.dtype], np.ndarray], float | None]] = [
    ("gaussian", lambda d: _gaussian(256, 384), 25.0),
    ("rows of mixed magnitude", lambda d: _mixed_rows(), 25.0),
    ("outliers", lambda d: _outliers(), None),
    ("edge tiles", lambda d: _gaussian(130, 257, 0.05, 7), 25.0),
    ("one element", lambda d: np.array([[-0.75]], np.float32), None),
    ("one column", lambda d: _gaussian(129, 1, 1.0, 8), None),
    ("ties at scale 1", lambda d: _ties_at_scale_one(), None),
    ("every bit pattern", _every_pattern, None),
    ("subnormal range", lambda d: _subnormal_range(), None),
    ("tiny weights", lambda d: _tiny(), None),
    ("all-zero tensor", lambda d: np.zeros((64, 96), np.float32), None),
    ("all-zero rows", lambda d: _zero_rows(), None),
    ("all-zero tiles", lambda d: _zero_tiles(), None),
    ("no rows", lambda d: np.zeros((0, 64), np.float32), None),
]


def cases(dtypes=DTYPES) -> list[Case]:
    """The battery: every case in every input dtype, in the order bugs are best explained
    (plain weights first, corner cases after)."""
    return [Case(name, torch.from_numpy(build(dtype)).to(dtype), floor)
            for name, build, floor in _CASES for dtype in dtypes]
