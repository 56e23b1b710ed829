"""Hypothesis strategies for FP8 quantization tests: weights, shapes, dtypes, bit patterns.

    from hypothesis import given
    from quantkit.testing import check_case, strategies as qs

    @given(x=qs.weights())
    def test_my_quantizer(x):
        failure = check_case(my_fn, x, "channel")      # or assertions of your own
        assert failure is None, failure

Weights are drawn as a few parameters (seed, magnitude, outliers, zeros) and built with numpy:
drawing every element through hypothesis would be slow for 128x128 tiles, and shrinking the
parameters still leads to a simple failing weight (fewer outliers, fewer zeros, smaller shape).
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from . import reference as R
from .conventions import BLOCK

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Largest magnitude decade per dtype that keeps outliers finite (float16's max is 65504).
_MAX_DECADE = {torch.bfloat16: 30, torch.float16: 2, torch.float32: 30}


def float_dtypes() -> st.SearchStrategy[torch.dtype]:
    """bf16, fp16 or fp32."""
    return st.sampled_from(FLOAT_DTYPES)


def shapes(max_rows: int = 300, max_cols: int = 300, *, empty: bool = True) -> st.SearchStrategy[tuple[int, int]]:
    """2-D weight shapes: around the tile size (127, 128, 129, 256 +- 1) and anywhere up to the
    maxima, 0 rows included when ``empty``."""
    edges = [1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 1]
    rows = st.one_of(st.sampled_from([e for e in edges if e <= max_rows]), st.integers(1, max_rows))
    cols = st.one_of(st.sampled_from([e for e in edges if e <= max_cols]), st.integers(1, max_cols))
    if empty:
        rows = st.one_of(rows, st.just(0))
    return st.tuples(rows, cols)


@st.composite
def weights(draw, shape=None, dtype=None, *, outliers: bool = True, subnormals: bool = True,
            zero_rows: bool = True, zero_tiles: bool = True, nonfinite: bool = False) -> torch.Tensor:
    """A 2-D weight: Gaussian at a drawn magnitude (1e-8 .. 1e30, within the dtype's range),
    optionally with outliers (x10 .. x1000), values spread down into FP8's subnormal range,
    all-zero rows, all-zero 128x128 tiles, and NaN / +-inf (only when ``nonfinite``)."""
    rows, cols = draw(shapes() if shape is None else st.just(shape))
    dtype = draw(float_dtypes() if dtype is None else st.just(dtype))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    decade = draw(st.integers(-8, _MAX_DECADE[dtype] - 3))
    x = rng.standard_normal((rows, cols)) * 10.0 ** decade
    if outliers and draw(st.booleans()):
        hit = rng.random(x.shape) < draw(st.sampled_from([1e-3, 1e-2]))
        x[hit] *= draw(st.sampled_from([10.0, 100.0, 1000.0]))
    if subnormals and draw(st.booleans()):
        # |x| / absmax down to 2^-16: x / scale falls below FP8's smallest normal (2^-6).
        x *= np.exp2(-rng.uniform(0, 16, size=x.shape))
    if zero_rows and rows and draw(st.booleans()):
        x[rng.random(rows) < 0.2] = 0.0
    if zero_tiles and draw(st.booleans()):
        for i in range(0, rows, BLOCK):
            for j in range(0, cols, BLOCK):
                if rng.random() < 0.3:
                    x[i:i + BLOCK, j:j + BLOCK] = 0.0
    if nonfinite and x.size and draw(st.booleans()):
        for value in draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=1, max_size=3)):
            x.flat[rng.integers(x.size)] = value
    return torch.from_numpy(x.astype(np.float32)).to(dtype)


@st.composite
def every_bf16_pattern(draw, shuffled: bool | None = None) -> torch.Tensor:
    """All 65,536 bfloat16 bit patterns (NaN and +-inf included) in one tensor: [256, 256] in
    pattern order (a row per high byte), or shuffled into [260, 253] with zero padding (edge
    tiles of 4 rows and 125 columns). Exhaustive: every bf16 input a quantizer can meet."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    if shuffled if shuffled is not None else draw(st.booleans()):
        padded = np.zeros(260 * 253, np.uint16)
        padded[:bits.size] = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1))).permutation(bits)
        bits = padded.reshape(260, 253)
    else:
        bits = bits.reshape(256, 256)
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)


def fp8_rounding_points(spec: R.Spec = R.E4M3FN) -> st.SearchStrategy[float]:
    """Every FP8 value, every midpoint between neighbours and the float32 either side of each
    (float32): the inputs where a rounding mode shows."""
    return st.sampled_from(R.neighbours_of_midpoints(spec).tolist())
