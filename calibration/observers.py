"""Observers: one small interface for the statistics a scale is made from.

An observer is fed tensors (``update``) and produces the range a scale covers (``statistic``):
float32, shaped like the scale (``quantkit.fp8.scale_shape``: ``[]`` per tensor, ``[out, 1]`` per
channel, ``[ceil(out/128), ceil(in/128)]`` per block). The scale is then ``statistic / 448``
(``quantkit.fp8.scale_from_absmax``); a statistic below absmax clips the largest values.

- ``AbsMax``: the running maximum of |x| (weights; static activation scales over batches).
- ``MovingAverage``: an exponential moving average of each batch's absmax (activations: one
  outlier batch moves the range by ``1 - momentum`` of the way, not all of it).
- ``Percentile``: the q-th percentile of |x| per tensor, the running maximum over batches.
- ``MSEClip``: for a weight (one update), the clipped range that minimises the FP8 round-trip
  error, searched over ratios of absmax per group (ratio 1 is always a candidate, so it is never
  worse than absmax on the data it saw).

    >>> import torch
    >>> from quantkit.calibration.observers import AbsMax
    >>> obs = AbsMax()
    >>> obs.update(torch.tensor([[1.0, -3.0]])); obs.update(torch.tensor([[2.0, 0.5]]))
    >>> float(obs.statistic())
    3.0
"""
from __future__ import annotations

import torch

from quantkit import fp8
from quantkit.fp8 import E4M3FN, FP8Format, Granularity


class Observer:
    """``update(x)`` with tensors of one shape; ``statistic()`` the range the scale covers."""

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def statistic(self) -> torch.Tensor:
        raise NotImplementedError


class AbsMax(Observer):
    def __init__(self, granularity: Granularity = Granularity.TENSOR):
        self.granularity, self.value = granularity, None

    def update(self, x: torch.Tensor) -> None:
        amax = fp8.absmax(x, self.granularity)
        self.value = amax if self.value is None else torch.maximum(self.value, amax)

    def statistic(self) -> torch.Tensor:
        return _seen(self.value)


class MovingAverage(Observer):
    """value <- momentum * value + (1 - momentum) * absmax(batch); the first batch sets it."""

    def __init__(self, momentum: float = 0.9, granularity: Granularity = Granularity.TENSOR):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum {momentum}: use a number in [0, 1)")
        self.momentum, self.granularity, self.value = momentum, granularity, None

    def update(self, x: torch.Tensor) -> None:
        amax = fp8.absmax(x, self.granularity)
        self.value = amax if self.value is None else self.momentum * self.value + (1 - self.momentum) * amax

    def statistic(self) -> torch.Tensor:
        return _seen(self.value)


class Percentile(Observer):
    """The q-th percentile of |x| per tensor (q a percent in (1, 100]; 100 is absmax), the maximum over batches.

    q at or below 1 is refused: it reads as a fraction (0.9999 for 99.99 %, as ``ema:0.9`` takes its
    momentum), and as a percent it would clip nearly every value of the tensor."""

    def __init__(self, q: float = 99.99):
        if 0.0 < q <= 1.0:
            raise ValueError(f"percentile takes a percent, e.g. percentile:99.99 ({q:g} reads as a fraction: "
                             f"for {100 * q:g} % write percentile:{100 * q:g})")
        if not 1.0 < q <= 100.0:
            raise ValueError(f"percentile {q:g}: percentile takes a percent in (1, 100], e.g. percentile:99.99")
        self.q, self.value = q, None

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().abs().reshape(-1)
        if flat.numel() == 0:
            return
        # kthvalue: exact, and unlike torch.quantile not limited to 16M elements.
        k = max(1, min(flat.numel(), int(-(-self.q * flat.numel() // 100))))
        v = flat.kthvalue(k).values
        self.value = v if self.value is None else torch.maximum(self.value, v)

    def statistic(self) -> torch.Tensor:
        return _seen(self.value)


class MSEClip(Observer):
    """The range, per group, among ``ratios`` x absmax whose FP8 round trip (quantize with that
    scale, clamp, dequantize) has the least squared error on the weight it saw."""

    RATIOS = tuple(1.0 - 0.02 * i for i in range(26))       # 1.00, 0.98, ..., 0.50

    def __init__(self, granularity: Granularity = Granularity.TENSOR, fmt: FP8Format = E4M3FN,
                 ratios: tuple[float, ...] = RATIOS):
        if 1.0 not in ratios or not all(0.0 < r <= 1.0 for r in ratios):
            raise ValueError("ratios must lie in (0, 1] and include 1 (absmax itself)")
        self.granularity, self.fmt, self.ratios, self.value = granularity, fmt, tuple(ratios), None

    def update(self, x: torch.Tensor) -> None:
        if self.value is not None:
            raise ValueError("MSEClip observes one weight (one update)")
        x = x.detach().float()
        amax = fp8.absmax(x, self.granularity)
        best, best_err = amax, None
        for r in self.ratios:
            rng = amax * r
            scale = fp8.scale_from_absmax(rng, self.fmt)
            x2 = fp8.as_2d(x)
            back = fp8.dequantize(fp8.quantize(x, scale, self.granularity, self.fmt), scale, self.granularity)
            err = _group_sum((back.reshape(x2.shape) - x2) ** 2, self.granularity, amax.shape)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best, best_err = torch.where(better, rng, best), torch.where(better, err, best_err)
        self.value = best

    def statistic(self) -> torch.Tensor:
        return _seen(self.value)


def _group_sum(e: torch.Tensor, granularity: Granularity, shape) -> torch.Tensor:
    """Sum of ``e`` ([rows, cols]) per scale group, shaped like the scale."""
    if granularity is Granularity.TENSOR:
        return e.sum()
    if granularity is Granularity.CHANNEL:
        return e.sum(dim=1, keepdim=True)
    rows, cols = e.shape
    nbr, nbc = shape
    padded = torch.zeros(nbr * fp8.BLOCK_SIZE, nbc * fp8.BLOCK_SIZE, dtype=e.dtype)
    padded[:rows, :cols] = e
    return padded.reshape(nbr, fp8.BLOCK_SIZE, nbc, fp8.BLOCK_SIZE).sum(dim=(1, 3))


def _seen(value):
    if value is None:
        raise ValueError("no tensor observed yet")
    return value
