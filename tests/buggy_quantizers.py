"""FP8 weight quantizers with the bugs that keep shipping, and correct ones, for the kit's tests.

Each is ``fn(x) -> (codes, scale)`` as ``quantkit.testing.check_quantizer`` and
``quantkit check-math buggy_quantizers:NAME`` take it. They are written in plain torch the way
third-party code is, not with quantkit.fp8 (except ``quantkit_*``, quantkit's own).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F

from quantkit import fp8

MAX = 448.0
FP8 = torch.float8_e4m3fn


def _absmax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    a = x.float().abs()
    if granularity == "tensor":
        return a.amax() if a.numel() else torch.zeros(())
    if granularity == "channel":
        return a.amax(dim=1, keepdim=True) if a.shape[1] else torch.zeros(a.shape[0], 1)
    rows, cols = a.shape
    a = F.pad(a, (0, -cols % 128, 0, -rows % 128))
    return a.reshape(a.shape[0] // 128, 128, a.shape[1] // 128, 128).amax(dim=(1, 3))


def _expand(scale: torch.Tensor, shape, granularity: str) -> torch.Tensor:
    if granularity != "block":
        return scale
    rows, cols = shape
    return scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]


def _quantize(x, scale, granularity):
    y = x.float() / _expand(scale, x.shape, granularity)
    return y.clamp(-MAX, MAX).to(FP8), scale


def _correct(x, granularity):
    amax = _absmax(x, granularity)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax.double() / MAX).float()
    return _quantize(x, scale, granularity)


def correct_tensor(x):
    return _correct(x, "tensor")


def correct_channel(x):
    return _correct(x, "channel")


def correct_block(x):
    return _correct(x, "block")


def quantkit_tensor(x):
    return _quantkit(x, fp8.Granularity.TENSOR)


def quantkit_channel(x):
    return _quantkit(x, fp8.Granularity.CHANNEL)


def quantkit_block(x):
    return _quantkit(x, fp8.Granularity.BLOCK)


def _quantkit(x, granularity):
    scale = fp8.scale_from_absmax(fp8.absmax(x, granularity))
    return fp8.quantize(x, scale, granularity), scale


# --- the bugs --------------------------------------------------------------------------------

def divides_by_127(x):
    """The INT8 formula: scale = absmax / 127. Codes then use a quarter of the E4M3 range."""
    amax = _absmax(x, "tensor")
    return _quantize(x, torch.where(amax == 0, 1.0, amax / 127.0).float(), "tensor")


def rounds_toward_zero(x):
    """Truncates x / scale to the FP8 value below it in magnitude (as a hand-written encoder might)."""
    codes, scale = correct_tensor(x)
    y = (x.float() / scale).clamp(-MAX, MAX)
    over = codes.float().abs() > y.abs()
    bits = codes.view(torch.uint8)
    return torch.where(over, bits - 1, bits).view(FP8), scale     # one step down in magnitude


def rounds_ties_away(x):
    """Rounds half away from zero (floor(v + 0.5) thinking): 1.0625 -> 1.125, not 1.0."""
    codes, scale = rounds_toward_zero(x)                 # the FP8 value at or below |x / scale|
    y = (x.float() / scale).clamp(-MAX, MAX).abs()
    bits = codes.view(torch.uint8)
    up = torch.where(y >= MAX, bits, bits + 1)           # the next value up in magnitude
    low, high = bits.view(FP8).float().abs(), up.view(FP8).float().abs()
    return torch.where(y >= (low + high) / 2, up, bits).view(FP8), scale


def float16_scale(x):
    """absmax / 448 computed in float16: 0 for absmax below ~1.4e-5, coarse below 0.027."""
    amax = _absmax(x, "tensor").half()
    scale = torch.where(amax == 0, 1.0, amax / MAX).float()
    return _quantize(x, scale, "tensor")


def bfloat16_scale(x):
    """absmax / 448 rounded to bf16 (torchao's default for bf16 weights), codes right for it."""
    amax = _absmax(x, "channel")
    return _quantize(x, torch.where(amax == 0, 1.0, amax / MAX).bfloat16().float(), "channel")


def block_ignores_edge_tiles(x):
    """Scales only for the whole 128x128 tiles; the partial tiles at the bottom and right keep 1."""
    rows, cols = x.shape
    scale = torch.ones(-(-rows // 128), -(-cols // 128))
    r, c = rows // 128, cols // 128
    if r and c:
        whole = x[:r * 128, :c * 128].float().abs().reshape(r, 128, c, 128).amax(dim=(1, 3))
        scale[:r, :c] = torch.where(whole == 0, 1.0, whole / MAX)
    return _quantize(x, scale, "block")


def zero_scale_nan(x):
    """scale = absmax / 448 with no case for absmax 0: an all-zero row gets NaN codes (0 / 0)."""
    scale = _absmax(x, "channel") / MAX
    return _quantize(x, scale, "channel")


def _clip_scale(x):
    # Clipping per row: the 99th percentile of |x| maps to 448, the outliers beyond it saturate.
    a = x.float().abs()
    if a.numel() == 0:
        return torch.ones(a.shape[0], 1)
    p = torch.quantile(a, 0.99, dim=1, keepdim=True)
    p = torch.where(p == 0, a.amax(dim=1, keepdim=True), p)
    return torch.where(p == 0, 1.0, p / MAX).float()


def clipping_without_clamp(x):
    """Clips at the 99th percentile and casts x / scale with ml_dtypes, which gives NaN past 464
    (no clamp: torch >= 2.12 would saturate and hide the bug)."""
    scale = _clip_scale(x)
    y = (x.float() / scale).numpy()
    codes = torch.from_numpy(y.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).copy()).view(FP8)
    return codes, scale


def clipping_with_clamp(x):
    """The same clipping quantizer, clamped before the cast: correct for scale_rule='any'."""
    scale = _clip_scale(x)
    y = np.clip((x.float() / scale).numpy(), -MAX, MAX)
    codes = torch.from_numpy(y.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).copy()).view(FP8)
    return codes, scale


not_callable = 42
