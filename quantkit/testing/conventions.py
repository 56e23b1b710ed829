"""Reference FP8 weight scales and codes as four projects compute them, in numpy.

Independent of torch's casts and of ``quantkit.fp8``: absmax by numpy reductions, arithmetic
in a given precision emulated by rounding float32 results (what torch's CPU kernels do for
bf16/fp16), codes by ``reference.encode``. All four agree on the rule ``scale = absmax / 448``
(E4M3; never over 127, the INT8 maximum) and ``code = RNE(clamp(x / scale, -448, 448))``; they
differ in the precision of each step and in what an all-zero group gets:

=================== ======================= ====================== =================== ===========
convention          scale computed in       all-zero group scale   x / scale in        granularity
=================== ======================= ====================== =================== ===========
QUANTKIT            float64, stored float32 1.0                    float32             all
COMPRESSED_TENSORS  x's dtype (bf16 for bf16 eps of x's dtype      x's dtype           all
                    weights), as stored     (bf16: 2^-7)
TORCHAO             x's dtype, stored f32   0: NaN codes (0 / 0)   float32             tensor, row
COMFYUI             x's dtype, stored f32   0: NaN codes           x * (1 / scale),    tensor
                                                                   both in x's dtype
=================== ======================= ====================== =================== ===========

Sources (read and run against the installed packages; tests/test_testing_kit.py
compares each row with the real library): compressed-tensors 0.20 ``calculate_qparams`` and
``forward_helpers._quantize`` (memoryless min-max observer on the weight, as llm-compressor
does by default); torchao 0.18 ``_choose_scale_float8`` / ``_quantize_affine_float8`` (what
``Float8Tensor.from_hp`` calls; its block sizes must divide the shape, so no edge tiles);
comfy-kitchen 0.2 ``TensorCoreFP8Layout.quantize`` with ``scale=None`` (ComfyUI's runtime
quantize, e.g. re-quantizing a LoRA-patched weight). For float32 weights the first three give
quantkit's codes on every nonzero group; for bf16 weights the bf16 scale moves a few percent
of codes by one step (see docs/testing.md for the measured share).
"""
from __future__ import annotations

import enum
import math

import numpy as np

from quantkit.dtypes import Granularity   # the enum only: no arithmetic from quantkit.fp8 is used here

from . import reference as R

BLOCK = 128


class Convention(enum.Enum):
    QUANTKIT = "quantkit"
    COMPRESSED_TENSORS = "compressed-tensors"
    TORCHAO = "torchao"
    COMFYUI = "comfyui"


class Precision(enum.Enum):
    """Floating-point precision of an intermediate result (a torch dtype's name)."""
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


def round_to(x, precision: Precision) -> np.ndarray:
    """float32 values rounded to ``precision`` (to nearest, ties to even), as float32.

    bfloat16 is the top half of a float32: add half of the dropped half (minus one unless the
    kept part is odd, which makes ties go to even) and cut. NaN stays NaN, overflow becomes inf.
    """
    x = np.asarray(x, dtype=np.float32)
    if precision is Precision.FLOAT32:
        return x.copy()
    if precision is Precision.FLOAT16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, rounded)


def as_2d(x: np.ndarray) -> np.ndarray:
    """[out, in] view: every dimension after the first is "in" (conv kernels)."""
    x = np.asarray(x)
    return x.reshape(1, 1) if x.ndim == 0 else x.reshape(x.shape[0], math.prod(x.shape[1:]))


def scale_shape(rows: int, cols: int, granularity: Granularity) -> tuple[int, ...]:
    """[] per tensor, [rows, 1] per channel, [ceil(rows/128), ceil(cols/128)] per block."""
    return {Granularity.TENSOR: (), Granularity.CHANNEL: (rows, 1),
            Granularity.BLOCK: (-(-rows // BLOCK), -(-cols // BLOCK))}[granularity]


def absmax(x2: np.ndarray, granularity: Granularity) -> np.ndarray:
    """max |x| per tensor / row / 128x128 tile (edge tiles smaller), float64; empty groups 0."""
    a = np.abs(np.asarray(x2, dtype=np.float64))
    rows, cols = a.shape
    if granularity is Granularity.TENSOR:
        return np.array(a.max() if a.size else 0.0)
    if granularity is Granularity.CHANNEL:
        return a.max(axis=1, keepdims=True) if cols else np.zeros((rows, 1))
    out = np.zeros(scale_shape(rows, cols, granularity))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = a[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].max()
    return out


def expand(scale: np.ndarray, rows: int, cols: int, granularity: Granularity) -> np.ndarray:
    """A scale broadcast to [rows, cols], element by element (edge tiles cut)."""
    scale = np.asarray(scale, dtype=np.float32)
    if granularity is Granularity.TENSOR:
        return np.full((rows, cols), scale.reshape(()), dtype=np.float32)
    if granularity is Granularity.CHANNEL:
        return np.repeat(scale.reshape(rows, 1), cols, axis=1)
    return np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[:rows, :cols]


def scale_from_absmax(amax: np.ndarray, convention: Convention = Convention.QUANTKIT,
                      precision: Precision = Precision.FLOAT32, spec: R.Spec = R.E4M3FN) -> np.ndarray:
    """float32 scales ``absmax / max_finite`` as ``convention`` computes them for a weight whose
    dtype is ``precision``."""
    amax = np.asarray(amax, dtype=np.float64)
    if convention is Convention.QUANTKIT:
        # Correctly rounded quotient; zero -> 1 (codes 0); a float32 underflow -> smallest normal.
        s = (amax / spec.max_finite).astype(np.float32)
        s = np.where(amax == 0, np.float32(1.0), s)
        return np.where(s == 0, np.finfo(np.float32).tiny, s).astype(np.float32)
    # The peers divide a tensor of x's dtype by a Python float: torch computes in float32 and
    # rounds to x's dtype (the absmax itself is exact there: it is one of x's values).
    with np.errstate(under="ignore"):
        s = round_to(amax.astype(np.float32) / np.float32(spec.max_finite), precision)
    if convention is Convention.COMPRESSED_TENSORS:
        eps = {Precision.FLOAT32: 2.0 ** -23, Precision.BFLOAT16: 2.0 ** -7, Precision.FLOAT16: 2.0 ** -10}
        s = np.where(s == 0, np.float32(eps[precision]), s)
    return s.astype(np.float32)


def quotient(x2: np.ndarray, scale_full: np.ndarray, convention: Convention = Convention.QUANTKIT,
             precision: Precision = Precision.FLOAT32) -> np.ndarray:
    """x / scale as ``convention`` forms it (float32 result), before clamp and cast."""
    x2 = np.asarray(x2, dtype=np.float32)
    s = np.asarray(scale_full, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        if convention is Convention.COMPRESSED_TENSORS:
            return round_to(x2 / round_to(s, precision), precision)
        if convention is Convention.COMFYUI:
            return round_to(x2 * round_to(np.float32(1.0) / s, precision), precision)
        return x2 / s


def quantize(x, granularity: Granularity, convention: Convention = Convention.QUANTKIT,
             precision: Precision = Precision.FLOAT32, spec: R.Spec = R.E4M3FN) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [rows, cols], scale float32) of a weight ``x`` (float32 values of a tensor of
    dtype ``precision``) under ``convention``.

    >>> codes, scale = quantize(np.array([[448.0, -1.0625], [0.0, 3.0]], np.float32), Granularity.CHANNEL)
    >>> [[hex(c) for c in row] for row in codes], scale.ravel().tolist()
    ([['0x7e', '0xb8'], ['0x0', '0x7e']], [1.0, 0.0066964286379516125])
    """
    x2 = as_2d(np.asarray(x, dtype=np.float32))
    rows, cols = x2.shape
    if granularity is not Granularity.TENSOR and convention is Convention.COMFYUI:
        raise ValueError("ComfyUI quantizes FP8 weights per tensor only")
    scale = scale_from_absmax(absmax(x2, granularity), convention, precision, spec)
    codes = R.encode(quotient(x2, expand(scale, rows, cols, granularity), convention, precision), spec)
    return codes, scale
