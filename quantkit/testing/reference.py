"""A bit-level reference for the two OCP FP8 encodings, written from the spec, not from quantkit.

Nothing here imports quantkit or torch (numpy only): quantkit's tests compare ``quantkit.fp8``
against this module, and this module against ml_dtypes and a brute-force nearest-value search,
so independent implementations have to agree. Use it to check any FP8 encoder:

    >>> from quantkit.testing import reference as R
    >>> [hex(c) for c in R.encode(np.array([1.0625, 1.1875, 500.0], np.float32))]
    ['0x38', '0x3a', '0x7e']
    >>> R.decode([0x7e, 0x01]).tolist()
    [448.0, 0.001953125]

An FP8 code is one byte ``S EEEE MMM`` (E4M3FN) or ``S EEEEE MM`` (E5M2):

    exponent field e == 0   subnormal:  (-1)^S * (M / 2^m)     * 2^(1 - bias)
    exponent field e  > 0   normal:     (-1)^S * (1 + M / 2^m) * 2^(e - bias)

The two encodings differ only in what they do with the top of the range:

    E4M3FN ("finite"): no infinity. Only S.1111.111 is NaN, so S.1111.110 = 448 is the largest value.
    E5M2 (IEEE-like):  exponent field 11111 is reserved: mantissa 0 is +-inf, otherwise NaN.
                       The largest finite value is S.11110.11 = 57344.

Encoding rounds the EXACT value to the nearest representable one, ties to the one with an even
mantissa (round-to-nearest-even), subnormals included. All arithmetic below is in float64 on
values that came from float32, and every step (abs, division by a power of two, rint, product
with a power of two) is exact there, so the only rounding is the one we ask for with ``np.rint``.

Two overflow behaviours:

    saturate=True   (quantkit's semantics) clamp to +-max_finite BEFORE rounding, so anything
                    beyond the range, infinities included, becomes +-max_finite.
    saturate=False  (a plain IEEE-style cast, what ml_dtypes does) a value that rounds past
                    max_finite becomes inf (E5M2) or NaN (E4M3FN, which has no inf).

NaN encodes as 0x7F with the input's sign bit (0x7F or 0xFF); compare NaNs with ``is_nan_code``.

Two wrong rounding modes are available too (``Rounding``), so that a checker can recognise them
in someone else's codes: truncation toward zero, and ties away from zero.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spec:
    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    ieee_specials: bool  # True: the top exponent field holds inf/NaN (E5M2). False: only all-ones is NaN.

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal (subnormals share it)."""
        return 1 - self.bias

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.min_exponent

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def max_finite(self) -> float:
        top_field = (1 << self.exponent_bits) - 1
        if self.ieee_specials:
            # Top exponent field is reserved; the largest finite has the next one, mantissa all ones.
            exponent, mantissa = top_field - 1, (1 << self.mantissa_bits) - 1
        else:
            # Top exponent field is ordinary except for all-ones mantissa (NaN).
            exponent, mantissa = top_field, (1 << self.mantissa_bits) - 2
        return (1 + mantissa / 2 ** self.mantissa_bits) * 2.0 ** (exponent - self.bias)

    @property
    def nan_code(self) -> int:
        return 0x7F

    @property
    def max_code(self) -> int:
        """Code of +max_finite (0x7E for E4M3FN, 0x7B for E5M2)."""
        return int(encode(np.float32(self.max_finite), self))

    @property
    def inf_code(self) -> int | None:
        if not self.ieee_specials:
            return None
        return ((1 << self.exponent_bits) - 1) << self.mantissa_bits


class Rounding(enum.Enum):
    NEAREST_EVEN = "round to nearest, ties to even"     # the only correct one (IEEE default, torch's cast)
    TOWARD_ZERO = "round toward zero (truncation)"
    NEAREST_AWAY = "round to nearest, ties away from zero"


E4M3FN = Spec("float8_e4m3fn", exponent_bits=4, mantissa_bits=3, bias=7, ieee_specials=False)
E5M2 = Spec("float8_e5m2", exponent_bits=5, mantissa_bits=2, bias=15, ieee_specials=True)
SPECS = {s.name: s for s in (E4M3FN, E5M2)}


def encode(x, spec: Spec = E4M3FN, saturate: bool = True,
           rounding: Rounding = Rounding.NEAREST_EVEN) -> np.ndarray:
    """FP8 codes (uint8) of float32 values ``x``, rounded to nearest, ties to even.

    >>> [hex(c) for c in encode(np.array([1.0, 1.0625, 1.1875, -0.0, 1e4], np.float32))]
    ['0x38', '0x38', '0x3a', '0x80', '0x7e']
    """
    x = np.asarray(x, dtype=np.float32)
    sign = np.where(np.signbit(x), 0x80, 0x00).astype(np.int64)
    nan = np.isnan(x)
    with np.errstate(invalid="ignore"):         # a signalling-NaN pattern warns on the cast
        a = np.abs(x.astype(np.float64))        # exact
    a = np.where(nan, 0.0, a)                   # keep NaN out of the arithmetic; patched in at the end
    if saturate:
        a = np.minimum(a, spec.max_finite)      # the quantizer's explicit clamp (inf -> max too)
    infinite = np.isinf(a)
    a = np.where(infinite, 0.0, a)

    m = spec.mantissa_bits
    # 1. Exponent of the binade holding a: a = f * 2^e with f in [0.5, 1), so floor(log2 a) = e - 1.
    #    Below the normal range every value shares the smallest exponent (that is what a subnormal is).
    _, e = np.frexp(a)
    exponent = np.maximum(e.astype(np.int64) - 1, spec.min_exponent)
    # 2. Spacing of representable values in that binade, and a rounded to a whole number of them.
    #    a / quantum is exact (power of two); np.rint rounds half to even, i.e. to an even mantissa.
    quantum = np.ldexp(1.0, exponent - m)
    value = _ROUND[rounding](a / quantum) * quantum   # exact; may carry into the next binade (1.96875 -> 2)

    # 3. Split the rounded value into exponent field and mantissa field.
    _, e = np.frexp(value)
    exponent = np.maximum(e.astype(np.int64) - 1, spec.min_exponent)
    normal = value >= spec.min_normal
    field = np.where(normal, exponent + spec.bias, 0)
    significand = (value / np.ldexp(1.0, exponent - m)).astype(np.int64)   # exact integer
    mantissa = np.where(normal, significand - (1 << m), significand)
    code = (field << m) | mantissa

    # 4. Specials.
    overflow = infinite | (value > spec.max_finite)   # only reachable with saturate=False
    if spec.ieee_specials:
        code = np.where(overflow, spec.inf_code, code)
    else:
        code = np.where(overflow, spec.nan_code, code)
    code = np.where(nan, spec.nan_code, code)
    return (code | sign).astype(np.uint8)


# Applied to a / quantum >= 0, so floor is truncation and floor(v + 0.5) rounds ties upward (away).
_ROUND = {Rounding.NEAREST_EVEN: np.rint, Rounding.TOWARD_ZERO: np.floor,
          Rounding.NEAREST_AWAY: lambda v: np.floor(v + 0.5)}


def decode(codes, spec: Spec = E4M3FN) -> np.ndarray:
    """float64 values of FP8 codes (NaN codes -> NaN, E5M2 inf codes -> +-inf, 0x80 -> -0.0)."""
    c = np.asarray(codes, dtype=np.uint8).astype(np.int64)
    m = spec.mantissa_bits
    field = (c >> m) & ((1 << spec.exponent_bits) - 1)
    mantissa = (c & ((1 << m) - 1)).astype(np.float64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    magnitude = np.where(
        field == 0,
        mantissa * 2.0 ** (spec.min_exponent - m),
        (2 ** m + mantissa) * np.ldexp(1.0, field - spec.bias - m),
    )
    value = sign * magnitude
    if spec.ieee_specials:
        top = field == (1 << spec.exponent_bits) - 1
        value = np.where(top & (mantissa == 0), sign * np.inf, value)
    value = np.where(is_nan_code(c, spec), np.copysign(np.nan, sign), value)
    return value


def is_nan_code(codes, spec: Spec = E4M3FN) -> np.ndarray:
    c = np.asarray(codes).astype(np.int64) & 0x7F
    if spec.ieee_specials:
        top = (c >> spec.mantissa_bits) == (1 << spec.exponent_bits) - 1
        return top & ((c & ((1 << spec.mantissa_bits) - 1)) != 0)
    return c == 0x7F


def quantize(x, scale, spec: Spec = E4M3FN) -> np.ndarray:
    """quantkit's defined semantics: codes of clamp(float32(x) / float32(scale)), division in float32.

    ``scale`` must already broadcast against ``x`` (expand per-channel / per-block scales first).
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        y = np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32)
    return encode(y, spec, saturate=True)


def same_codes(a, b, spec: Spec = E4M3FN) -> np.ndarray:
    """Element-wise: equal bytes, or both NaN codes (the NaN sign/payload is not specified)."""
    a = np.asarray(a, dtype=np.uint8)
    b = np.asarray(b, dtype=np.uint8)
    return (a == b) | (is_nan_code(a, spec) & is_nan_code(b, spec))


def all_bf16_as_float32() -> np.ndarray:
    """The 65,536 bfloat16 bit patterns as float32 (exact: bf16 is the top half of a float32)."""
    bits = np.arange(1 << 16, dtype=np.uint32) << 16
    return bits.view(np.float32)


def all_fp16_as_float32() -> np.ndarray:
    """The 65,536 float16 bit patterns as float32 (exact)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def neighbours_of_midpoints(spec: Spec = E4M3FN) -> np.ndarray:
    """Every representable value, every midpoint between adjacent ones, and the float32 just below
    and just above each: the complete set of rounding decisions an FP8 encoder has to get right."""
    codes = np.arange(0x80, dtype=np.uint8)
    values = decode(codes, spec)
    values = np.sort(values[np.isfinite(values)])
    points = np.concatenate([values, (values[:-1] + values[1:]) / 2,
                             [values[-1] + (values[-1] - values[-2]) / 2]]).astype(np.float32)
    below = np.nextafter(points, np.float32(-np.inf))
    above = np.nextafter(points, np.float32(np.inf))
    positive = np.concatenate([points, below, above])
    positive = positive[positive >= 0]
    return np.concatenate([positive, -positive]).astype(np.float32)


def encode_by_search(x, spec: Spec = E4M3FN) -> np.ndarray:
    """The definition of round-to-nearest-even, by brute force, for finite float32 ``x``
    (saturating): of all finite codes pick the one whose value is nearest to clamp(x); on a tie,
    the even code (the code's last bit is the mantissa's last bit). Slow; a check on ``encode``."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("encode_by_search takes finite values only (NaN and inf have no nearest code)")
    codes = np.arange(0x80, dtype=np.int64)
    codes = codes[np.isfinite(decode(codes, spec))]          # the finite non-negative codes
    values = decode(codes, spec)
    a = np.minimum(np.abs(x), spec.max_finite)
    out = np.empty(a.shape, dtype=np.int64)
    for start in range(0, a.size, 4096):                      # chunks keep the distance table small
        dist = np.abs(a[start:start + 4096, None] - values[None, :])
        nearest = dist == dist.min(axis=1, keepdims=True)
        odd_penalty = (codes[None, :] & 1) * 0.5              # on a tie prefer the even code
        best = np.where(nearest, odd_penalty, np.inf).argmin(axis=1)
        out[start:start + 4096] = codes[best]
    return (out | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)
