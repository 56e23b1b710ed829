"""Observers (quantkit.calibration.observers): each statistic against an independent computation,
and MSE clipping never worse than absmax on the weight it saw."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantkit import fp8
from quantkit.calibration.observers import AbsMax, MovingAverage, MSEClip, Percentile
from quantkit.dtypes import Granularity

GRANULARITIES = list(Granularity)


def weights(seed: int, rows: int, cols: int, outliers: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.02
    for i in range(outliers):
        x[(seed + i) % rows, (7 * i + seed) % cols] = 0.5 * (-1) ** i
    return x


def roundtrip_error(x, statistic, granularity) -> float:
    scale = fp8.scale_from_absmax(statistic)
    back = fp8.dequantize(fp8.quantize(x, scale, granularity), scale, granularity).reshape(fp8.as_2d(x).shape)
    return float(((back - fp8.as_2d(x).float()) ** 2).sum())


@given(seed=st.integers(0, 10_000), rows=st.integers(1, 300), cols=st.integers(1, 300),
       batches=st.integers(1, 4), g=st.sampled_from(GRANULARITIES))
def test_absmax_over_batches_is_the_absmax_of_them_all(seed, rows, cols, batches, g):
    parts = [weights(seed + b, rows, cols) for b in range(batches)]
    obs = AbsMax(g)
    for p in parts:
        obs.update(p)
    want = np.max(np.abs(np.stack([p.numpy() for p in parts])), axis=0)          # elementwise over batches
    assert torch.equal(obs.statistic(), fp8.absmax(torch.from_numpy(want), g))


def test_moving_average_by_hand():
    obs = MovingAverage(momentum=0.75)
    for value in (4.0, 8.0, 0.0):
        obs.update(torch.tensor([[value, -value / 2]]))
    assert float(obs.statistic()) == pytest.approx(0.75 * (0.75 * 4 + 0.25 * 8) + 0.25 * 0)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 5000), q=st.floats(1.0, 100.0, exclude_min=True))
def test_percentile_matches_numpy(seed, n, q):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    obs = Percentile(q)
    obs.update(x.reshape(1, -1))
    # numpy's 'inverted_cdf': the smallest value with at least q % of the data at or below it
    want = np.percentile(np.abs(x.numpy()), q, method="inverted_cdf")
    assert float(obs.statistic()) == pytest.approx(float(want), rel=1e-6)
    obs100 = Percentile(100.0)
    obs100.update(x.reshape(1, -1))
    assert float(obs100.statistic()) == float(x.abs().max())


@given(seed=st.integers(0, 10_000), rows=st.integers(1, 200), cols=st.integers(1, 200),
       outliers=st.integers(0, 3), g=st.sampled_from(GRANULARITIES))
def test_mse_clip_is_never_worse_than_absmax_and_never_above_it(seed, rows, cols, outliers, g):
    x = weights(seed, rows, cols, outliers)
    obs = MSEClip(g)
    obs.update(x)
    clip, amax = obs.statistic(), fp8.absmax(x, g)
    assert clip.shape == amax.shape and bool((clip <= amax).all()) and bool((clip >= 0.5 * amax).all())
    assert roundtrip_error(x, clip, g) <= roundtrip_error(x, amax, g) * (1 + 1e-6)


def test_mse_clip_gains_where_it_can_and_keeps_a_lone_outlier():
    """FP8 is floating point: a large scale costs small values little relative precision, so per
    tensor a lone outlier is kept (clipping it would cost more than the grid saves); per output
    row, the search moves some rows' ranges below absmax and the error falls (measured: 4.7 % on
    a 512x512 Gaussian)."""
    x = weights(0, 512, 512)
    x[3, 5] = 4.0
    per_tensor = MSEClip(Granularity.TENSOR)
    per_tensor.update(x)
    assert float(per_tensor.statistic()) == 4.0
    per_row = MSEClip(Granularity.CHANNEL)
    per_row.update(x)
    amax = fp8.absmax(x, Granularity.CHANNEL)
    assert bool((per_row.statistic() < amax).any())
    assert roundtrip_error(x, per_row.statistic(), Granularity.CHANNEL) < \
        0.97 * roundtrip_error(x, amax, Granularity.CHANNEL)


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="no tensor"):
        AbsMax().statistic()
    with pytest.raises(ValueError, match="momentum"):
        MovingAverage(momentum=1.0)
    with pytest.raises(ValueError, match="percentile"):
        Percentile(0)
    with pytest.raises(ValueError, match="include 1"):
        MSEClip(ratios=(0.9, 0.8))
    obs = MSEClip()
    obs.update(torch.ones(2, 2))
    with pytest.raises(ValueError, match="one weight"):
        obs.update(torch.ones(2, 2))
