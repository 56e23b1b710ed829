"""Quality metrics of a reconstruction ``y`` of an original ``x``.

    PSNR   = 10 log10(peak^2 / MSE), peak = max |x| (the original's absmax)
    SQNR   = 10 log10(sum x^2 / sum (x - y)^2)          signal power over error power
    cosine = <x, y> / (|x| |y|)
    max abs error = max |x - y|

``ErrorStats`` accumulates them over chunks (sums in float64), so a tensor never has to be in
memory whole. An exact reconstruction has infinite PSNR/SQNR. Where the original is NaN/Inf
the position is counted and left out; a NaN/Inf reconstruction of a finite value is an
infinite error (SQNR = PSNR = -inf), never hidden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ErrorStats:
    n: int = 0
    sum_x2: float = 0.0
    sum_y2: float = 0.0
    sum_xy: float = 0.0
    sum_e2: float = 0.0
    peak: float = 0.0
    max_err: float = 0.0
    nonfinite: int = 0      # positions where the original x is NaN/Inf (left out of the sums)
    broken: int = 0         # positions where x is finite but y is NaN/Inf: an infinite error

    def update(self, x: torch.Tensor, y: torch.Tensor) -> "ErrorStats":
        x = x.reshape(-1).double()
        y = y.reshape(-1).double()
        fx, fy = torch.isfinite(x), torch.isfinite(y)
        if not bool((fx & fy).all()):
            self.nonfinite += int((~fx).sum())
            self.broken += int((fx & ~fy).sum())
            x, y = x[fx & fy], y[fx & fy]
        if x.numel() == 0:
            return self
        e = x - y
        self.n += x.numel()
        self.sum_x2 += float(torch.dot(x, x))
        self.sum_y2 += float(torch.dot(y, y))
        self.sum_xy += float(torch.dot(x, y))
        self.sum_e2 += float(torch.dot(e, e))
        self.peak = max(self.peak, float(x.abs().max()))
        self.max_err = max(self.max_err, float(e.abs().max()))
        return self

    @property
    def max_abs_error(self) -> float:
        return math.inf if self.broken else self.max_err

    @property
    def mse(self) -> float:
        return self.sum_e2 / self.n if self.n else 0.0

    @property
    def psnr(self) -> float:
        if self.broken:
            return -math.inf
        if self.sum_e2 == 0:
            return math.inf
        if self.peak == 0:
            return -math.inf
        return 10 * math.log10(self.peak ** 2 / self.mse)

    @property
    def sqnr(self) -> float:
        if self.broken:
            return -math.inf
        if self.sum_e2 == 0:
            return math.inf
        if self.sum_x2 == 0:
            return -math.inf
        return 10 * math.log10(self.sum_x2 / self.sum_e2)

    @property
    def cosine(self) -> float:
        if self.broken:
            return math.nan
        if self.sum_x2 == 0 or self.sum_y2 == 0:
            return 1.0 if self.sum_x2 == self.sum_y2 else 0.0
        return self.sum_xy / math.sqrt(self.sum_x2 * self.sum_y2)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB with the original's absmax as peak."""
    return ErrorStats().update(x, y).psnr


def sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return ErrorStats().update(x, y).sqnr


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return ErrorStats().update(x, y).cosine


def max_abs_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return ErrorStats().update(x, y).max_abs_error
