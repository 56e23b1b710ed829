"""quantkit.metrics checked against the formulas written out in numpy (float64).

    PSNR   = 10 log10(peak^2 / MSE), peak = max |x|
    SQNR   = 10 log10(sum x^2 / sum (x - y)^2)
    cosine = <x, y> / (|x| |y|)
    max abs error = max |x - y|
Positions where x or y is NaN/Inf are left out of the sums and counted in ``nonfinite``.
Float64 inputs are summed in float64 (relative error 1e-10 here); float32 and narrower ones
as float32 products summed pairwise (1e-6), falling back to float64 where float32 would
overflow, underflow or meet NaN/Inf. max |x| is exact; max |x - y| too in float64, and within
2^-24 relative (x - y rounded to float32) otherwise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantkit.testing import reference as R
from quantkit import fp8 as F
from quantkit.fp8 import Granularity as G
from quantkit.metrics import ErrorStats, cosine, max_abs_error, psnr, sqnr


def reference(x: np.ndarray, y: np.ndarray) -> dict:
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    fx, fy = np.isfinite(x), np.isfinite(y)
    broken = int((fx & ~fy).sum())      # a finite value reconstructed as NaN/Inf
    finite = fx & fy
    x, y = x[finite], y[finite]
    e = x - y
    sum_e2, sum_x2, sum_y2 = np.sum(e * e), np.sum(x * x), np.sum(y * y)
    mse = sum_e2 / x.size if x.size else 0.0
    peak = np.abs(x).max() if x.size else 0.0
    return {
        "n": x.size, "nonfinite": int((~fx).sum()), "broken": broken, "mse": mse,
        "max_err": np.abs(e).max() if x.size else 0.0, "peak": peak,
        "sqnr": -math.inf if broken else math.inf if sum_e2 == 0 else (-math.inf if sum_x2 == 0 else 10 * math.log10(sum_x2 / sum_e2)),
        "psnr": -math.inf if broken else math.inf if sum_e2 == 0 else (-math.inf if peak == 0 else 10 * math.log10(peak ** 2 / mse)),
        "cosine": math.nan if broken else (1.0 if sum_x2 == sum_y2 else 0.0) if sum_x2 == 0 or sum_y2 == 0
        else np.dot(x, y) / math.sqrt(sum_x2 * sum_y2),
    }


REL64, REL32 = 1e-10, 1e-6


def check(stats: ErrorStats, want: dict, rel=REL64):
    assert stats.n == want["n"] and stats.nonfinite == want["nonfinite"] and stats.broken == want["broken"]
    assert stats.peak == want["peak"]
    if rel == REL64:
        assert stats.max_err == want["max_err"]
    else:
        assert stats.max_err == pytest.approx(want["max_err"], rel=2 ** -24, abs=0)
        assert (stats.max_err == 0) == (want["max_err"] == 0)        # exact stays exact
    for k in ("mse", "sqnr", "psnr", "cosine"):
        got = getattr(stats, k)
        # float32: an absolute bound too where a value may be near 0 (dB of a ratio near 1, or a
        # cosine whose <x, y> cancels): a relative error of the sums is an absolute one there.
        near0 = rel > REL64 and k != "mse"
        assert got == pytest.approx(want[k], rel=rel, abs=10 * rel if near0 else 1e-300, nan_ok=True), k


def t(a, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32)).to(dtype)


# ---------------------------------------------------------------------------------------------
# hand-computed values
# ---------------------------------------------------------------------------------------------

def test_hand_computed():
    x, y = t([3.0, 4.0]), t([3.0, 4.5])
    # e = [0, -0.5]: sum e^2 = 0.25, sum x^2 = 25 -> SQNR = 10 log10(100) = 20 dB
    assert sqnr(x, y) == pytest.approx(20.0, rel=1e-15)
    # MSE = 0.125, peak 4 -> PSNR = 10 log10(128)
    assert psnr(x, y) == pytest.approx(10 * math.log10(128), rel=1e-15)
    assert cosine(x, y) == pytest.approx((9 + 18) / (5 * math.sqrt(9 + 20.25)), rel=1e-15)
    assert max_abs_error(x, y) == 0.5
    s = ErrorStats().update(x, y)
    assert (s.n, s.mse, s.peak, s.nonfinite) == (2, 0.125, 4.0, 0)


@pytest.mark.parametrize("db", [10.0, 20.0, 30.0, 43.0])
def test_known_noise_level(db):
    """y = x (1 + c) has SQNR exactly -20 log10 |c| and cosine 1."""
    x = np.random.default_rng(0).standard_normal(10_000)
    c = 10 ** (-db / 20)
    assert sqnr(torch.from_numpy(x), torch.from_numpy(x * (1 + c))) == pytest.approx(db, rel=1e-9)
    assert cosine(torch.from_numpy(x), torch.from_numpy(x * (1 + c))) == pytest.approx(1.0, abs=1e-12)


def test_exact_reconstruction_is_infinite():
    x = t(np.linspace(-3, 3, 101))
    s = ErrorStats().update(x, x.clone())
    assert (s.sqnr, s.psnr, s.cosine, s.max_err, s.mse) == (math.inf, math.inf, 1.0, 0.0, 0.0)


def test_zero_signal_conventions():
    z, o = torch.zeros(4), torch.ones(4)
    assert (sqnr(z, z), psnr(z, z), cosine(z, z)) == (math.inf, math.inf, 1.0)
    assert (sqnr(z, o), psnr(z, o), cosine(z, o)) == (-math.inf, -math.inf, 0.0)
    assert cosine(o, z) == 0.0 and sqnr(o, z) == 0.0        # y = 0: error power == signal power
    empty = ErrorStats()
    assert (empty.n, empty.mse, empty.sqnr, empty.psnr) == (0, 0.0, math.inf, math.inf)


def test_sign_flip():
    x = t([1.0, -2.0, 3.0])
    assert cosine(x, -x) == pytest.approx(-1.0, rel=1e-15)
    assert sqnr(x, -x) == pytest.approx(10 * math.log10(1 / 4), rel=1e-15)   # error 2x -> power 4x


# ---------------------------------------------------------------------------------------------
# properties against the numpy reference
# ---------------------------------------------------------------------------------------------

dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


@given(seed=st.integers(0, 2 ** 32 - 1), n=st.integers(1, 5000), noise=st.floats(1e-6, 1.0),
       dtype=dtypes, shape2d=st.booleans())
def test_matches_reference(seed, n, noise, dtype, shape2d):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)
    y = x + rng.standard_normal(n) * noise * np.abs(x).max()
    xt, yt = t(x, dtype), t(y, dtype)
    if shape2d and n % 2 == 0:
        xt, yt = xt.reshape(2, -1), yt.reshape(2, -1)
    want = reference(xt.double().numpy(), yt.double().numpy())
    rel = REL64 if dtype is torch.float64 else REL32
    check(ErrorStats().update(xt, yt), want, rel)
    near0 = 0 if dtype is torch.float64 else 10 * rel
    assert sqnr(xt, yt) == pytest.approx(want["sqnr"], rel=rel, abs=near0)
    assert psnr(xt, yt) == pytest.approx(want["psnr"], rel=rel, abs=near0)
    assert cosine(xt, yt) == pytest.approx(want["cosine"], rel=rel, abs=near0)
    want_max = want["max_err"] if dtype is torch.float64 else pytest.approx(want["max_err"], rel=2 ** -24, abs=0)
    assert max_abs_error(xt, yt) == want_max


@given(seed=st.integers(0, 2 ** 32 - 1), n=st.integers(1, 3000),
       cuts=st.lists(st.floats(0, 1), max_size=6), specials=st.integers(0, 5))
def test_chunked_accumulation_equals_whole(seed, n, cuts, specials):
    """Updating over any split into chunks gives the same statistics as one update."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    y = (x + rng.standard_normal(n) * 0.01).astype(np.float32)
    for _ in range(specials):   # NaN / inf: left out of the sums, counted (x) or an infinite error (y)
        i = rng.integers(n)
        (x if rng.random() < 0.5 else y)[i] = rng.choice([np.nan, np.inf, -np.inf])
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    chunked = ErrorStats()
    for a, b in zip(bounds, bounds[1:]):
        chunked.update(t(x[a:b]), t(y[a:b]))
    want = reference(x, y)
    check(chunked, want, REL32)
    check(ErrorStats().update(t(x), t(y)), want, REL32)


@given(seed=st.integers(0, 2 ** 32 - 1), k=st.integers(-30, 30))
def test_power_of_two_scaling_invariance(seed, k):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(500)
    y = x + rng.standard_normal(500) * 0.03
    a = ErrorStats().update(torch.from_numpy(x), torch.from_numpy(y))
    b = ErrorStats().update(torch.from_numpy(np.ldexp(x, k)), torch.from_numpy(np.ldexp(y, k)))
    assert (a.sqnr, a.psnr, a.cosine) == (b.sqnr, b.psnr, b.cosine)   # every sum scales exactly
    assert b.max_err == math.ldexp(a.max_err, k)


@pytest.mark.parametrize("k", [-149, -140, -120, -100, -70, 0, 50, 62, 64, 100, 124])
def test_float32_extremes_match_float64(k):
    """Float32 magnitudes whose squares underflow or overflow float32 (2^-149 .. 2^126): the
    float32 path hands them to float64, so the figures stay those of the float64 reference."""
    rng = np.random.default_rng(k + 200)
    x = np.ldexp(rng.standard_normal(4096), k).astype(np.float32)
    y = (x * (1 + rng.standard_normal(4096) * 0.01)).astype(np.float32)
    if k <= -140:                           # the smallest subnormals: a few values and zeros
        x, y = np.ldexp(rng.integers(-8, 9, 4096), -149).astype(np.float32), np.zeros(4096, np.float32)
    want = reference(x, y)
    assert np.isfinite(x).all() and np.isfinite(y).all() and want["n"] == 4096
    check(ErrorStats().update(t(x), t(y)), want, REL32)


@pytest.mark.parametrize("case", ["normal", "zeros", "nan", "tiny", "huge", "empty"])
def test_update_exact_is_update_of_a_copy(case):
    """The shortcut for chunks reconstructed bit for bit gives what update(x, x) gives."""
    x = np.random.default_rng(3).standard_normal(3000).astype(np.float32)
    x = {"normal": x, "zeros": np.zeros(3000, np.float32), "tiny": np.ldexp(x, -90).astype(np.float32),
         "huge": np.ldexp(x, 100).astype(np.float32), "empty": x[:0],
         "nan": np.where(np.arange(3000) % 7 == 0, np.nan, x).astype(np.float32)}[case]
    a, b = ErrorStats().update_exact(t(x)), ErrorStats().update(t(x), t(x).clone())
    assert a == b
    check(a, reference(x, x), REL32)


# ---------------------------------------------------------------------------------------------
# on an FP8 round trip: metrics agree with the test's own numpy SQNR and the fp8 reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gran", list(G), ids=lambda g: g.value)
def test_fp8_round_trip_metrics(gran):
    x = torch.from_numpy((np.random.default_rng(1).standard_normal((512, 384)) * 0.02).astype(np.float32))
    scale = F.scale_from_absmax(F.absmax(x, gran))
    w = F.dequantize(F.quantize(x, scale, gran), scale, gran)
    want = reference(x.numpy(), w.numpy())
    check(ErrorStats().update(x, w), want, REL32)
    assert want["sqnr"] >= 30.0 and want["cosine"] > 0.999
    # Per tensor: the worst error is at most half an FP8 step at the top of the range (2^(8-4) * scale).
    if gran is G.TENSOR:
        assert max_abs_error(x, w) <= 16 * scale.item() * (1 + 2 ** -20)
        codes = F.quantize(x, scale).view(torch.uint8).numpy()
        assert np.array_equal(w.numpy(), R.decode(codes).astype(np.float32) * scale.numpy())


# ---------------------------------------------------------------------------------------------
# non-finite values
# ---------------------------------------------------------------------------------------------

def test_nonfinite_positions_are_counted_and_left_out():
    x = t([1.0, 2.0, np.nan, 4.0, 5.0])
    y = t([1.5, np.inf, np.nan, 4.0, -np.inf])
    s = ErrorStats().update(x, y)
    assert s.nonfinite == 1 and s.broken == 2 and s.n == 2
    check(s, reference(x.numpy(), y.numpy()))
    assert s.sum_e2 == 0.25 and s.max_err == 0.5 and s.max_abs_error == math.inf and s.sqnr == -math.inf


def test_nonfinite_reconstruction_of_finite_data_is_not_exact():
    x = t([1.0, 2.0, 3.0, 4.0])
    y = t([1.0, np.nan, 3.0, np.inf])
    s = ErrorStats().update(x, y)
    assert s.broken == 2 and s.sqnr == -math.inf and s.psnr == -math.inf and s.max_abs_error == math.inf
