"""quantkit.fp8 checked bit for bit against an independent reference (quantkit/testing/reference.py).

The reference is itself checked against ml_dtypes and against a brute-force nearest-value search,
so a pass here means three implementations agree: the spec written out in numpy, ml_dtypes, and
quantkit (torch). The reference, its absmax / scale / broadcast helpers and the battery of the
last section are quantkit.testing's, the kit other projects use on their own quantizers.

Defined semantics under test (quantkit/fp8.py):
    scale = float32(absmax / max_finite)  computed in float64;  absmax == 0 -> scale 1
    q     = fp8(clamp(float32(x) / float32(scale), -max, +max))  round to nearest, ties to even
    W     = float32(q) * float32(scale)
"""
from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantkit.testing import check_quantizer
from quantkit.testing import conventions as C
from quantkit.testing import reference as R
from quantkit import fp8 as F
from quantkit.fp8 import Granularity as G

SPECS = [R.E4M3FN, R.E5M2]
FORMAT_OF = {R.E4M3FN: F.E4M3FN, R.E5M2: F.E5M2}
ML_DTYPE_OF = {R.E4M3FN: ml_dtypes.float8_e4m3fn, R.E5M2: ml_dtypes.float8_e5m2}
TINY = np.finfo(np.float32).tiny
BLOCK = 128


# ---------------------------------------------------------------------------------------------
# helpers (independent of quantkit.fp8 except for the function under test)
# ---------------------------------------------------------------------------------------------

def t32(a) -> torch.Tensor:
    """numpy float32 -> torch float32, bit patterns (NaN payloads, -0.0) preserved."""
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))   # keeps 0-d


def codes(q: torch.Tensor) -> np.ndarray:
    return q.contiguous().view(torch.uint8).numpy()


def from_codes(c: np.ndarray, spec: R.Spec) -> torch.Tensor:
    return torch.from_numpy(np.array(c, dtype=np.uint8, order="C", copy=True)).view(FORMAT_OF[spec].torch_dtype)


def all_patterns(kind: str) -> tuple[torch.Tensor, np.ndarray]:
    """All 65,536 bit patterns of bf16 / fp16: as a native torch tensor and as numpy float32."""
    bits = np.arange(1 << 16, dtype=np.uint16).view(np.int16)
    native = torch.from_numpy(bits.copy()).view(torch.bfloat16 if kind == "bf16" else torch.float16)
    ref = R.all_bf16_as_float32() if kind == "bf16" else R.all_fp16_as_float32()
    return native, ref


def assert_same_codes(actual: np.ndarray, expected: np.ndarray, spec: R.Spec, inputs=None):
    ok = R.same_codes(actual, expected, spec)
    if not ok.all():
        bad = np.flatnonzero(~ok.ravel())[:8]
        detail = [(None if inputs is None else float(np.ravel(inputs)[i]),
                   hex(np.ravel(actual)[i]), hex(np.ravel(expected)[i])) for i in bad]
        pytest.fail(f"{(~ok).sum()} of {ok.size} codes differ (input, got, want): {detail}")


# The reference's absmax, scale rule and broadcast (numpy, independent of quantkit.fp8).
as_2d_np = C.as_2d
naive_absmax = C.absmax
naive_expand = C.expand


def spec_scale(amax: np.ndarray, spec: R.Spec) -> np.ndarray:
    """The documented scale rule: float32(absmax / max) in float64, zero -> 1, underflow -> tiny."""
    return C.scale_from_absmax(amax, C.Convention.QUANTKIT, spec=spec)


def round_to_float32(q: Fraction) -> np.float32:
    """The float32 nearest to an exact rational (ties to even), found by exact comparison."""
    guess = np.float32(float(q))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    candidates = [c for c in candidates if np.isfinite(c)]
    dist = [abs(Fraction(float(c)) - q) for c in candidates]
    best = min(dist)
    ties = [c for c, d in zip(candidates, dist) if d == best]
    return min(ties, key=lambda c: int(np.array(c, np.float32).view(np.uint32)) & 1)


def sqnr_db(x: np.ndarray, x_hat: np.ndarray) -> float:
    x = x.astype(np.float64)
    return 10 * math.log10(np.sum(x * x) / np.sum((x - x_hat.astype(np.float64)) ** 2))


# ---------------------------------------------------------------------------------------------
# 0. the format table agrees with the bit layout, torch and ml_dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_format_table(spec):
    fmt = FORMAT_OF[spec]
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias) == (spec.exponent_bits, spec.mantissa_bits, spec.bias)
    assert fmt.max_finite == spec.max_finite == float(torch.finfo(fmt.torch_dtype).max) \
        == float(ml_dtypes.finfo(ML_DTYPE_OF[spec]).max)
    assert fmt.min_normal == spec.min_normal == float(torch.finfo(fmt.torch_dtype).tiny)
    assert fmt.min_subnormal == spec.min_subnormal == float(ml_dtypes.finfo(ML_DTYPE_OF[spec]).smallest_subnormal)
    assert fmt.has_inf == spec.ieee_specials
    assert F.FP8_FORMATS[fmt.name] is fmt


def test_format_constants_literal():
    assert (F.E4M3FN.max_finite, F.E4M3FN.min_normal, F.E4M3FN.min_subnormal) == (448.0, 2.0 ** -6, 2.0 ** -9)
    assert (F.E5M2.max_finite, F.E5M2.min_normal, F.E5M2.min_subnormal) == (57344.0, 2.0 ** -14, 2.0 ** -16)
    assert F.E4M3FN.torch_dtype is torch.float8_e4m3fn and F.E5M2.torch_dtype is torch.float8_e5m2


# ---------------------------------------------------------------------------------------------
# 1. the reference itself: against ml_dtypes, against brute-force search, and its decoder
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("saturate", [True, False], ids=["clamped", "plain-cast"])
@pytest.mark.parametrize("source", ["bf16", "fp16", "midpoints"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_reference_encoder_matches_ml_dtypes(spec, source, saturate):
    x = {"bf16": R.all_bf16_as_float32, "fp16": R.all_fp16_as_float32,
         "midpoints": lambda: R.neighbours_of_midpoints(spec)}[source]()
    with np.errstate(invalid="ignore"):
        y = np.clip(x, -spec.max_finite, spec.max_finite) if saturate else x
        theirs = y.astype(ML_DTYPE_OF[spec]).view(np.uint8)
    assert_same_codes(R.encode(x, spec, saturate=saturate), theirs, spec, x)


@pytest.mark.parametrize("source", ["bf16", "fp16", "midpoints"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_reference_encoder_matches_brute_force_nearest(spec, source):
    x = {"bf16": R.all_bf16_as_float32, "fp16": R.all_fp16_as_float32,
         "midpoints": lambda: R.neighbours_of_midpoints(spec)}[source]()
    x = x[np.isfinite(x)]
    assert_same_codes(R.encode(x, spec), R.encode_by_search(x, spec), spec, x)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_reference_decoder_matches_ml_dtypes_and_torch(spec):
    c = np.arange(256, dtype=np.uint8)
    ours = R.decode(c, spec)
    assert np.array_equal(ours, c.view(ML_DTYPE_OF[spec]).astype(np.float64), equal_nan=True)
    assert np.array_equal(ours, from_codes(c, spec).double().numpy(), equal_nan=True)
    finite = np.isfinite(ours)
    assert np.array_equal(np.signbit(ours[finite]), c[finite] >= 0x80)   # -0.0 keeps its sign
    # Every finite code survives decode -> encode.
    assert np.array_equal(R.encode(ours[finite].astype(np.float32), spec, saturate=False), c[finite])
    assert R.is_nan_code(c, spec).sum() == (2 if spec is R.E4M3FN else 6)


# ---------------------------------------------------------------------------------------------
# 2. edge values
# ---------------------------------------------------------------------------------------------

NAN = None   # "some NaN code"
f32 = np.float32
up = lambda v: float(np.nextafter(f32(v), f32(np.inf)))     # noqa: E731  the float32 just above
down = lambda v: float(np.nextafter(f32(v), f32(-np.inf)))  # noqa: E731  the float32 just below

E4M3_EDGES = [
    (0.0, 0x00), (-0.0, 0x80),
    (2.0 ** -9, 0x01), (-(2.0 ** -9), 0x81),           # min subnormal
    (2.0 ** -10, 0x00), (-(2.0 ** -10), 0x80),         # half of it: tie -> even (zero)
    (up(2.0 ** -10), 0x01), (down(2.0 ** -10), 0x00),  # either side of the tie
    (1.5 * 2.0 ** -9, 0x02), (2.5 * 2.0 ** -9, 0x02),  # ties between subnormals -> even
    (7 * 2.0 ** -9, 0x07),                             # largest subnormal
    (7.5 * 2.0 ** -9, 0x08),                           # tie subnormal/normal -> min normal (even)
    (2.0 ** -6, 0x08), (-(2.0 ** -6), 0x88),           # min normal
    (1.0, 0x38), (-1.0, 0xB8),
    (1.0625, 0x38), (up(1.0625), 0x39),                # tie -> 1.0 (even); just above -> 1.125
    (1.125, 0x39), (1.1875, 0x3A),                     # tie 1.125/1.25 -> 1.25 (even)
    (1.9375, 0x40),                                    # tie 1.875/2.0 -> 2.0: carry into the exponent
    (256.0, 0x78), (416.0, 0x7D), (432.0, 0x7E),       # tie 416/448 -> 448 (even)
    (448.0, 0x7E), (-448.0, 0xFE),                     # max
    (464.0, 0x7E), (465.0, 0x7E), (480.0, 0x7E),       # beyond max: clamped
    (1e4, 0x7E), (3.4e38, 0x7E), (math.inf, 0x7E),
    (-465.0, 0xFE), (-math.inf, 0xFE),
    (math.nan, NAN), (-math.nan, NAN),
]

E5M2_EDGES = [
    (0.0, 0x00), (-0.0, 0x80),
    (2.0 ** -16, 0x01), (2.0 ** -17, 0x00), (up(2.0 ** -17), 0x01),   # min subnormal, tie, above
    (3 * 2.0 ** -17, 0x02), (2.0 ** -14, 0x04),                       # tie -> even; min normal
    (1.0, 0x3C), (1.125, 0x3C), (up(1.125), 0x3D), (1.375, 0x3E),    # ties -> even mantissa
    (1.875, 0x40),                                                     # tie 1.75/2.0 -> carry
    (57344.0, 0x7B), (-57344.0, 0xFB),                                 # max
    (61440.0, 0x7B), (1e6, 0x7B), (math.inf, 0x7B), (-math.inf, 0xFB),  # clamped, never inf
    (math.nan, NAN),
]


def _check_edge(spec, value, expected):
    x = np.array([value], dtype=np.float32)
    got = {
        "reference": R.encode(x, spec),
        "quantkit": codes(F.quantize(t32(x), torch.tensor(1.0), G.TENSOR, FORMAT_OF[spec])),
        "ml_dtypes": np.clip(x, -spec.max_finite, spec.max_finite).astype(ML_DTYPE_OF[spec]).view(np.uint8),
    }
    for who, c in got.items():
        if expected is NAN:
            assert R.is_nan_code(c, spec).all(), (who, hex(c[0]))
        else:
            assert c[0] == expected, f"{who}: {value!r} -> {hex(c[0])}, want {hex(expected)}"


@pytest.mark.parametrize("value,expected", E4M3_EDGES, ids=[f"{v!r}" for v, _ in E4M3_EDGES])
def test_e4m3_edge_values(value, expected):
    _check_edge(R.E4M3FN, value, expected)


@pytest.mark.parametrize("value,expected", E5M2_EDGES, ids=[f"{v!r}" for v, _ in E5M2_EDGES])
def test_e5m2_edge_values(value, expected):
    _check_edge(R.E5M2, value, expected)


def test_reference_plain_cast_overflow():
    """Without the clamp, E4M3FN overflows to NaN and E5M2 to inf: why quantize() clamps first."""
    x = np.array([464.0, 465.0, -465.0], np.float32)
    c = R.encode(x, R.E4M3FN, saturate=False)
    assert c[0] == 0x7E and R.is_nan_code(c[1:], R.E4M3FN).all()
    y = np.array([down(61440.0), 61440.0, -1e6, math.inf], np.float32)
    assert list(R.encode(y, R.E5M2, saturate=False)) == [0x7B, 0x7C, 0xFC, 0x7C]


# ---------------------------------------------------------------------------------------------
# 3. bit-exact over every bf16 / fp16 bit pattern
# ---------------------------------------------------------------------------------------------

E4M3_SCALES = [1.0, 2.0 ** -7, 1 / 448, 3.7e-3, 0.5, 13.25, 2.0 ** -100, 1e30, 2.0 ** -130, "absmax"]
E5M2_SCALES = [1.0, 1 / 57344, 3.7e-3, 2.0 ** 20, "absmax"]


def _tensor_scale(spec, ref, scale):
    if scale != "absmax":
        return np.float32(scale)
    finite = np.where(np.isfinite(ref), ref, 0)
    amax = F.absmax(t32(finite), G.TENSOR)
    assert amax.item() == np.abs(finite).max()
    s = F.scale_from_absmax(amax, FORMAT_OF[spec])
    assert s.dtype == torch.float32 and s.item() == spec_scale(np.abs(finite).max(), spec)
    return np.float32(s.item())


@pytest.mark.parametrize("source", ["bf16", "fp16"])
@pytest.mark.parametrize("spec,scale", [(R.E4M3FN, s) for s in E4M3_SCALES] + [(R.E5M2, s) for s in E5M2_SCALES],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_all_patterns_per_tensor(spec, scale, source):
    native, ref = all_patterns(source)
    s = _tensor_scale(spec, ref, scale)
    q = F.quantize(native, torch.tensor(s), G.TENSOR, FORMAT_OF[spec])
    assert q.dtype == FORMAT_OF[spec].torch_dtype and q.shape == native.shape
    assert_same_codes(codes(q), R.quantize(ref, s, spec), spec, ref)


def _layout(ref: np.ndarray, native: torch.Tensor, layout: str):
    """[256, 256] in pattern order (row = high byte), or all patterns shuffled into a zero-padded
    [260, 253] (edge tiles of 4 rows / 125 columns)."""
    if layout == "256x256":
        return ref.reshape(256, 256), native.reshape(256, 256)
    perm = np.random.default_rng(7).permutation(ref.size)
    bits = np.zeros(260 * 253, dtype=np.uint16)
    bits[:ref.size] = np.arange(ref.size, dtype=np.uint16)[perm]
    bits = bits.reshape(260, 253)
    native_bits = torch.from_numpy(bits.view(np.int16).copy()).view(native.dtype)
    ref_full = R.all_bf16_as_float32() if native.dtype == torch.bfloat16 else R.all_fp16_as_float32()
    return ref_full[bits], native_bits


@pytest.mark.parametrize("layout", ["256x256", "260x253-shuffled"])
@pytest.mark.parametrize("gran", [G.CHANNEL, G.BLOCK], ids=lambda g: g.value)
@pytest.mark.parametrize("source", ["bf16", "fp16"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_all_patterns_per_channel_and_block(spec, source, gran, layout):
    native, ref = all_patterns(source)
    ref2, native2 = _layout(ref, native, layout)
    rows, cols = ref2.shape
    # Scales from the absmax of the finite values (NaN/inf would make their row's scale NaN/inf).
    finite = np.where(np.isfinite(ref2), ref2, 0).astype(np.float32)
    amax = F.absmax(t32(finite), gran)
    want_amax = naive_absmax(finite, gran)
    assert tuple(amax.shape) == want_amax.shape == F.scale_shape((rows, cols), gran)
    assert np.array_equal(amax.numpy(), want_amax)
    scale = F.scale_from_absmax(amax, FORMAT_OF[spec])
    assert np.array_equal(scale.numpy(), spec_scale(want_amax, spec))
    # ... and quantize everything, NaN and inf included.
    q = F.quantize(native2, scale, gran, FORMAT_OF[spec])
    want = R.quantize(ref2, naive_expand(scale.numpy(), rows, cols, gran), spec)
    assert_same_codes(codes(q), want, spec, ref2)


# ---------------------------------------------------------------------------------------------
# 4. properties
# ---------------------------------------------------------------------------------------------

def f32s(lo, hi):
    """float32 values in [lo, hi] (bounds rounded to float32 first)."""
    return st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32)


normal_scales = f32s(2.0 ** -100, 2.0 ** 100)
specs = st.sampled_from(SPECS)


@given(y=hnp.arrays(np.float32, st.integers(1, 256), elements=f32s(2.0 ** -6, 448.0)),
       negative=st.booleans(), scale=normal_scales)
def test_round_trip_relative_error_in_normal_range(y, negative, scale):
    s = np.float32(scale)
    x = (y * s) * np.float32(-1 if negative else 1)             # float32 products
    y = x / s                                                   # the value actually quantized
    keep = (np.abs(y) >= 2.0 ** -6) & (np.abs(y) <= 448.0)
    assume(keep.any())
    x, y = x[keep], y[keep]
    q = F.quantize(t32(x), torch.tensor(s))
    qv = q.double().numpy()
    # Exact bound on the FP8 value: half a unit in the last place, i.e. 2^-4 relative.
    assert np.all(np.abs(qv - y) <= 2.0 ** -4 * np.abs(y))
    assert np.all(np.abs(qv - y) <= np.ldexp(1.0, np.frexp(y.astype(np.float64))[1] - 1 - 4))
    # On the dequantized weight: the same bound plus float32 rounding of x / s and q * s.
    w = F.dequantize(q, torch.tensor(s)).numpy().astype(np.float64)
    assert np.all(np.abs(w - x) <= 2.0 ** -4 * (1 + 2.0 ** -18) * np.abs(x))


nonzero_mag = f32s(2.0 ** -40, 2.0 ** 40)
moderate = st.one_of(st.just(0.0), nonzero_mag, nonzero_mag.map(lambda v: -v))


@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=moderate),
       scale=f32s(2.0 ** -40, 2.0 ** 40), k=st.integers(-60, 60), spec=specs)
def test_power_of_two_rescaling_invariance(x, scale, k, spec):
    fmt = FORMAT_OF[spec]
    s = np.float32(scale)
    xk, sk = np.ldexp(x, k).astype(np.float32), np.ldexp(s, k).astype(np.float32)
    assert np.array_equal(xk / sk, x / s)          # no over/underflow: x*2^k and s*2^k are exact
    a = codes(F.quantize(t32(x), torch.tensor(s), G.TENSOR, fmt))
    b = codes(F.quantize(t32(xk), torch.tensor(sk), G.TENSOR, fmt))
    assert np.array_equal(a, b)


@given(mag=hnp.arrays(np.float32, st.integers(1, 64),
                      elements=st.one_of(f32s(448.0, 3.4e38), st.just(math.inf))),
       negative=hnp.arrays(np.bool_, 64), scale=st.one_of(normal_scales, f32s(1e-44, 1e-38)), spec=specs)
def test_saturation(mag, negative, scale, spec):
    s = np.float32(scale)
    sign = np.where(negative[:mag.size], np.float32(-1), np.float32(1))
    with np.errstate(over="ignore"):
        x = np.float32(spec.max_finite / 448.0) * mag * s * sign   # E5M2: rescale into its range
        y = x / s
    keep = np.abs(y) >= spec.max_finite
    assume(keep.any())
    x = x[keep]
    c = codes(F.quantize(t32(x), torch.tensor(s), G.TENSOR, FORMAT_OF[spec]))
    want = np.where(np.signbit(x), spec.max_code | 0x80, spec.max_code)
    assert np.array_equal(c, want)
    assert np.array_equal(R.decode(c, spec), np.copysign(spec.max_finite, x))


any_f32 = st.floats(width=32)   # NaN, inf, subnormals, -0.0 included


@given(x=hnp.arrays(np.float32, st.integers(1, 128), elements=any_f32),
       scale=st.one_of(normal_scales, f32s(1e-45, 3.4e38)), spec=specs)
def test_sign_symmetry_and_reference(x, scale, spec):
    fmt = FORMAT_OF[spec]
    s = torch.tensor(np.float32(scale))
    pos = codes(F.quantize(t32(x), s, G.TENSOR, fmt))
    neg = codes(F.quantize(t32(-x), s, G.TENSOR, fmt))
    nan = np.isnan(x)
    assert np.array_equal(neg[~nan], pos[~nan] ^ 0x80)
    assert R.is_nan_code(pos[nan], spec).all() and R.is_nan_code(neg[nan], spec).all()
    assert_same_codes(pos, R.quantize(x, np.float32(scale), spec), spec, x)


shapes = st.one_of(
    st.tuples(st.integers(1, 300), st.integers(1, 300)),                     # linear weights
    st.tuples(st.integers(1, 400)),                                          # biases / norms
    st.tuples(st.integers(1, 160), st.integers(1, 24), st.integers(1, 3), st.integers(1, 3)),  # conv
    st.tuples(st.integers(1, 200), st.integers(1, 20), st.integers(1, 9)),   # conv1d
    st.just(()),
)
grans = st.sampled_from(list(G))
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _weights(shape, seed, dtype, zero_tiles, zero_rows) -> tuple[torch.Tensor, np.ndarray]:
    """Gaussian weights over several magnitudes with some all-zero 128x128 tiles and rows."""
    rng = np.random.default_rng(seed)
    x = np.array(rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 2), dtype=np.float32)
    x2 = as_2d_np(x)
    for i in range(0, x2.shape[0], BLOCK):
        for j in range(0, x2.shape[1], BLOCK):
            if rng.random() < zero_tiles:
                x2[i:i + BLOCK, j:j + BLOCK] = 0
    x2[rng.random(x2.shape[0]) < zero_rows] = 0
    xt = t32(x).to(dtype)
    return xt, xt.float().numpy()   # numpy copy holds exactly the values quantize() will see


@given(shape=shapes, gran=grans, dtype=dtypes, seed=st.integers(0, 2 ** 32 - 1),
       zero_tiles=st.sampled_from([0.0, 0.3, 1.0]), zero_rows=st.sampled_from([0.0, 0.2]), spec=specs)
def test_granularity_shapes_absmax_scale_quantize(shape, gran, dtype, seed, zero_tiles, zero_rows, spec):
    fmt = FORMAT_OF[spec]
    xt, x = _weights(shape, seed, dtype, zero_tiles, zero_rows)
    x2 = as_2d_np(x)
    rows, cols = x2.shape
    want_shape = {G.TENSOR: (), G.CHANNEL: (rows, 1),
                  G.BLOCK: (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))}[gran]
    assert F.scale_shape(tuple(shape), gran) == want_shape

    amax = F.absmax(xt, gran)
    want_amax = naive_absmax(x2, gran)
    assert amax.dtype == torch.float32 and tuple(amax.shape) == want_shape
    assert np.array_equal(amax.numpy(), want_amax)

    scale = F.scale_from_absmax(amax, fmt)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == want_shape
    sn = scale.numpy()
    assert np.all(sn[want_amax == 0] == 1.0)                              # all-zero tensor/row/tile
    assert np.array_equal(sn, spec_scale(want_amax, spec))

    expanded = naive_expand(sn, rows, cols, gran)
    assert np.array_equal(np.broadcast_to(F.expand_scale(scale, rows, cols, gran).numpy(), (rows, cols)), expanded)

    q = F.quantize(xt, scale, gran, fmt)
    assert q.shape == xt.shape and q.dtype == fmt.torch_dtype
    want_codes = R.quantize(x2, expanded, spec)
    assert_same_codes(as_2d_np(codes(q)), want_codes, spec, x2)
    # The largest |x| of every group lands on (or next to) +-max: the scale uses the whole range.
    if want_amax.max() >= spec.max_finite * TINY and gran is G.TENSOR:
        assert np.abs(R.decode(want_codes, spec)).max() == spec.max_finite

    w = F.dequantize(q, scale, gran)
    assert w.dtype == torch.float32 and w.shape == xt.shape
    assert np.array_equal(as_2d_np(w.numpy()), R.decode(want_codes, spec).astype(np.float32) * expanded)


@given(rows=st.integers(1, 400), cols=st.integers(1, 300), gran=grans, chunk=st.integers(1, 3),
       seed=st.integers(0, 2 ** 32 - 1))
def test_chunked_quantization_with_scale_rows(rows, cols, gran, chunk, seed):
    """Quantizing row chunks with scale_rows() gives the same bytes as quantizing the whole weight."""
    xt, _ = _weights((rows, cols), seed, torch.bfloat16, 0.2, 0.1)
    scale = F.scale_from_absmax(F.absmax(xt, gran))
    whole = codes(F.quantize(xt, scale, gran))
    whole_w = F.dequantize(F.quantize(xt, scale, gran), scale, gran).numpy()
    step = chunk * F.block_rows(gran) * (1 if gran is G.BLOCK else 37)
    # Buffers reused by every chunk, as the streaming converter does; filled with NaN / 0xFF
    # first so stale contents would show.
    work = torch.full((min(rows, step) * cols + 5,), math.nan)
    out = torch.full((min(rows, step) * cols + 5,), math.nan).to(F.E4M3FN.torch_dtype)
    parts, parts_w = [], []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s = F.scale_rows(scale, gran, r0, r1)
        qb = F.quantize(xt[r0:r1], s, gran, out=out, work=work)
        assert qb.shape == xt[r0:r1].shape and qb.data_ptr() == out.data_ptr()
        assert np.array_equal(codes(qb), whole[r0:r1])
        # Per channel / block, a chunk's scale is exactly the scale of that chunk alone (shape and
        # values); per tensor it is the whole tensor's scale.
        assert tuple(s.shape) == F.scale_shape((r1 - r0, cols), gran)
        own = scale if gran is G.TENSOR else F.scale_from_absmax(F.absmax(xt[r0:r1], gran))
        assert torch.equal(s, own)
        qc = F.quantize(xt[r0:r1], s, gran)
        parts.append(codes(qc))
        parts_w.append(F.dequantize(qc, s, gran).numpy())
    assert np.array_equal(np.concatenate(parts), whole)
    assert np.array_equal(np.concatenate(parts_w), whole_w)


@given(scale=st.one_of(normal_scales, f32s(1e-45, 3.4e38)), spec=specs,
       out=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_dequantize_every_code(scale, spec, out):
    c = np.arange(256, dtype=np.uint8)
    s = np.float32(scale)
    w = F.dequantize(from_codes(c, spec), torch.tensor(s), G.TENSOR, dtype=out)
    assert w.dtype == out
    with np.errstate(over="ignore", invalid="ignore"):
        want32 = R.decode(c, spec).astype(np.float32) * s                 # the float32 product
    if out is torch.float32:
        got = w.numpy()
        want = want32
    else:                                                                 # then one rounding to out
        mld = ml_dtypes.bfloat16 if out is torch.bfloat16 else np.float16
        with np.errstate(over="ignore"):
            want = want32.astype(mld).astype(np.float64)
        got = w.double().numpy()
    assert np.array_equal(got, want, equal_nan=True)
    finite = np.isfinite(want)
    assert np.array_equal(np.signbit(got[finite]), np.signbit(want[finite]))


@given(shape=st.tuples(st.integers(1, 300), st.integers(1, 300)), gran=grans,
       where=st.tuples(st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True)),
       special=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_absmax_propagates_nan_and_inf(shape, gran, where, special):
    x = np.ones(shape, dtype=np.float32)
    r, c = int(where[0] * shape[0]), int(where[1] * shape[1])
    x[r, c] = special
    amax = F.absmax(t32(x), gran).numpy()
    want = naive_absmax(x, gran)
    assert np.array_equal(amax, want, equal_nan=True)
    hit = {G.TENSOR: (), G.CHANNEL: (r, 0), G.BLOCK: (r // BLOCK, c // BLOCK)}[gran]
    assert (np.isnan(amax[hit]) if math.isnan(special) else amax[hit] == math.inf)
    assert np.sum(~np.isfinite(amax)) == 1


# ---------------------------------------------------------------------------------------------
# 5. the scale formula
# ---------------------------------------------------------------------------------------------

ABSMAXES = [1.0, 448.0, 0.02, 3.14159, 1e-3, 7.0, 65504.0, 3.3895e38, 1e-30, 127.0, 57344.0]


@pytest.mark.parametrize("amax", ABSMAXES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_scale_is_absmax_over_fp8_max(spec, amax):
    a = np.float32(amax)
    s = F.scale_from_absmax(torch.tensor(a), FORMAT_OF[spec])
    assert s.dtype == torch.float32 and s.shape == ()
    exact = round_to_float32(Fraction(float(a)) / Fraction(spec.max_finite))
    assert s.item() == exact                                  # correctly rounded absmax / max
    assert s.item() == np.float32(float(a) / spec.max_finite)
    assert s.item() != np.float32(float(a) / 127.0)           # not the INT8 formula
    assert s.item() != np.float32(float(a) / (448.0 if spec is R.E5M2 else 57344.0))  # not the other format
    # The absmax element lands exactly on the largest code.
    x = torch.tensor([a, -a, a / 2])
    c = codes(F.quantize(x, s, G.TENSOR, FORMAT_OF[spec]))
    assert c[0] == spec.max_code and c[1] == spec.max_code | 0x80
    w = F.dequantize(F.quantize(x, s, G.TENSOR, FORMAT_OF[spec]), s).numpy()
    assert abs(float(w[0]) - float(a)) <= 2.0 ** -22 * float(a)


@given(amax=f32s(448 * 2.0 ** -126, 3.4e38), spec=specs)
def test_scale_correctly_rounded(amax, spec):
    s = F.scale_from_absmax(torch.tensor([np.float32(amax)]), FORMAT_OF[spec]).item()
    assert s == round_to_float32(Fraction(float(np.float32(amax))) / Fraction(spec.max_finite))


@pytest.mark.parametrize("gran", list(G), ids=lambda g: g.value)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (130, 260), (129, 3, 3, 3)])
def test_all_zero_tensor_gets_scale_exactly_one(shape, gran):
    for zero in (torch.zeros(shape), -torch.zeros(shape), torch.zeros(shape, dtype=torch.bfloat16)):
        s = F.scale_from_absmax(F.absmax(zero, gran))
        assert s.dtype == torch.float32 and torch.all(s == 1.0)
        q = F.quantize(zero, s, gran)
        assert np.array_equal(codes(q) & 0x7F, np.zeros(shape, np.uint8))
        assert torch.all(F.dequantize(q, s, gran) == 0)


def test_scale_underflow_and_subnormal_absmax():
    # A nonzero absmax whose scale underflows float32 gets the smallest normal float32, and for
    # E4M3 its values then quantize to (signed) zero.
    a = torch.tensor([1e-45, 2.0 ** -142, 0.0], dtype=torch.float32)
    s = F.scale_from_absmax(a)
    assert s.tolist() == [float(TINY), float(TINY), 1.0]
    q = codes(F.quantize(torch.tensor([1e-45, -(2.0 ** -142)]), s[1]))
    assert list(q) == [0x00, 0x80]
    # A scale that is subnormal but not zero is kept as computed.
    b = torch.tensor(np.float32(2.0 ** -128))
    assert F.scale_from_absmax(b).item() == np.float32(2.0 ** -128 / 448)


# ---------------------------------------------------------------------------------------------
# 6. quality floor
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gran", list(G), ids=lambda g: g.value)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sqnr_floor_gaussian(seed, gran):
    rng = np.random.default_rng(seed)
    std = [0.02, 1.0, 3e-4][seed]
    x = (rng.standard_normal((1024, 1024)) * std).astype(np.float32)
    if seed == 2:   # rows of very different magnitude: where per-channel/per-block scales pay off
        x *= (10.0 ** rng.uniform(-2, 2, size=(1024, 1))).astype(np.float32)
    for dtype in (torch.float32, torch.bfloat16):
        xt = t32(x).to(dtype)
        xn = xt.float().numpy()
        scale = F.scale_from_absmax(F.absmax(xt, gran))
        w = F.dequantize(F.quantize(xt, scale, gran), scale, gran).numpy()
        db = sqnr_db(xn, w)
        assert db >= 30.0, f"{gran.value} {dtype} seed {seed}: SQNR {db:.2f} dB"


# ---------------------------------------------------------------------------------------------
# 7. empty tensors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gran", list(G), ids=lambda g: g.value)
@pytest.mark.parametrize("shape", [(5, 0), (3, 0, 2)])
def test_empty_columns(shape, gran):
    x = torch.zeros(shape)
    s = F.scale_from_absmax(F.absmax(x, gran))
    assert tuple(s.shape) == F.scale_shape(shape, gran) and torch.all(s == 1.0)
    q = F.quantize(x, s, gran)
    assert q.shape == x.shape and F.dequantize(q, s, gran).shape == x.shape


@pytest.mark.parametrize("gran", list(G), ids=lambda g: g.value)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (0, 0)])
def test_empty_rows(shape, gran):
    x = torch.zeros(shape)
    s = F.scale_from_absmax(F.absmax(x, gran))
    assert tuple(s.shape) == F.scale_shape(shape, gran)
    q = F.quantize(x, s, gran)
    assert q.shape == x.shape and F.dequantize(q, s, gran).shape == x.shape


@given(shape=shapes, gran=grans, dtype=dtypes, seed=st.integers(0, 2 ** 32 - 1), spec=specs,
       spare=st.integers(0, 300))
def test_quantize_into_preallocated_buffers(shape, gran, dtype, seed, spec, spare):
    """quantize(..., out=, work=) writes the same bytes as a fresh quantize, whatever the buffers held."""
    fmt = FORMAT_OF[spec]
    xt, x = _weights(shape, seed, dtype, 0.2, 0.1)
    scale = F.scale_from_absmax(F.absmax(xt, gran), fmt)
    n = xt.numel() + spare
    work = torch.full((n,), math.nan)
    out = torch.from_numpy(np.full(n, 0x7F, np.uint8)).view(fmt.torch_dtype)
    q = F.quantize(xt, scale, gran, fmt, out=out, work=work)
    assert q.shape == xt.shape and q.dtype == fmt.torch_dtype
    want = R.quantize(as_2d_np(x), naive_expand(scale.numpy(), *as_2d_np(x).shape, gran), spec)
    assert_same_codes(as_2d_np(codes(q)), want, spec)
    assert np.array_equal(codes(q), codes(F.quantize(xt, scale, gran, fmt)))
    assert np.all(out.view(torch.uint8).numpy()[xt.numel():] == 0x7F)     # nothing written past n


# ---------------------------------------------------------------------------------------------
# 8. the whole quantizer through quantkit.testing's battery (what any third party can run)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gran", list(G), ids=lambda g: g.value)
def test_quantkit_passes_the_kit(gran):
    def quantkit_fp8(x):
        scale = F.scale_from_absmax(F.absmax(x, gran))
        return F.quantize(x, scale, gran), scale
    report = check_quantizer(quantkit_fp8, gran, examples=20)
    assert report.passed and len(report.cases) == 43
    assert report.min_sqnr_db >= 30.0


@given(st.floats(min_value=2.0 ** -100, max_value=2.0 ** 120, allow_nan=False), st.sampled_from(["e4m3", "e5m2"]))
def test_static_activation_scale_is_the_power_of_two_at_or_above_range_over_max(rng, kind):
    """Exact rationals: the scale is a power of two s with range / max <= s < 2 * range / max, so the
    calibrated range never clips and lands in FP8's top binade."""
    fmt = F.E4M3FN if kind == "e4m3" else F.E5M2
    s = F.static_activation_scale(rng, fmt)
    ratio = Fraction(rng) / Fraction(fmt.max_finite)
    assert Fraction(s).numerator == 1 or Fraction(s).denominator == 1           # a power of two
    assert math.frexp(s)[0] == 0.5
    assert ratio <= Fraction(s) < 2 * ratio


def test_static_activation_scale_edges():
    assert F.static_activation_scale(0.0) == 1.0 and F.static_activation_scale(448.0) == 1.0
    assert F.static_activation_scale(448.0 * 2 ** -10) == 2 ** -10 and F.static_activation_scale(449.0) == 2.0
    assert F.static_activation_scale(57344.0, F.E5M2) == 1.0
    assert F.static_activation_scale(1e-45) == torch.finfo(torch.float32).tiny    # float32's smallest normal


@given(c=hnp.arrays(np.uint8, st.integers(0, 3000)), spec=specs,
       scale=st.one_of(st.none(), normal_scales, f32s(1e-45, 3.4e38)), spare=st.integers(0, 5))
def test_decode_any_codes_into_a_buffer(c, spec, scale, spare):
    """``decode`` (integer shifts to float16, then one cast) against the reference, codes in any
    order and mix (NaN codes anywhere), into a reused buffer longer than needed, with and
    without a scale: the float32 values bit for bit, NaN where the reference has NaN."""
    out = torch.full((c.size + spare,), 7.0)
    s = None if scale is None else torch.tensor(np.float32(scale))
    got = F.decode(from_codes(c, spec), out, scale=s).numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        want = R.decode(c, spec).astype(np.float32) * (np.float32(1) if s is None else np.float32(scale))
    assert got.shape == c.shape
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got[np.isfinite(want)]), np.signbit(want[np.isfinite(want)]))
    assert (out[c.size:] == 7.0).all()
