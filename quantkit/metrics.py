"""Quality metrics of a reconstruction ``y`` of an original ``x``.

    PSNR   = 10 log10(peak^2 / MSE), peak = max |x| (the original's absmax)
    SQNR   = 10 log10(sum x^2 / sum (x - y)^2)          signal power over error power
    cosine = <x, y> / (|x| |y|)
    max abs error = max |x - y|

``ErrorStats`` accumulates them over chunks (float32 chunk sums added up in float64, or float64
throughout where float32 would overflow, underflow or meet NaN/Inf), so a tensor never has
to be in memory whole. An exact reconstruction has infinite PSNR/SQNR. Where the original is
NaN/Inf the position is counted and left out; a NaN/Inf reconstruction of a finite value is an
infinite error (SQNR = PSNR = -inf), never hidden.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch


# A float32 sum of squares below this is redone in float64: squares under float32's smallest
# normal (2^-126) lose precision or vanish, and even 2^30 of them stay under 2^-36 of it.
_TINY = 2.0 ** -60


_WORK = threading.local()


def _work(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 buffers of ``n`` elements, reused by this thread's later chunks: fresh ones
    page-fault on every chunk (measured: the products and differences of a 6 GB validation went
    from ~1 to ~10 CPU-s on a machine short of free pages)."""
    bufs = getattr(_WORK, "bufs", None)
    if bufs is None or bufs[0].numel() < n:
        bufs = _WORK.bufs = (torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32))
    return bufs[0][:n], bufs[1][:n]


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
        """Add a chunk: ``x`` the original, ``y`` its reconstruction (same number of elements)."""
        x, y = x.reshape(-1), y.reshape(-1)
        if x.numel() and x.dtype is torch.float32 and y.dtype is torch.float32 and self._update_float32(x, y):
            return self
        return self._update_float64(x, y)

    def update_exact(self, x: torch.Tensor) -> "ErrorStats":
        """``update(x, x)``, about 3x faster: a chunk reconstructed bit for bit (a kept tensor)."""
        x = x.reshape(-1)
        if x.numel() and x.dtype is torch.float32:
            sum_x2 = float(torch.mul(x, x, out=_work(x.numel())[1]).sum())
            lo, hi = torch.aminmax(x)
            peak = max(-float(lo), float(hi))
            # Trusted as in _update_float32: finite, and no square lost to underflow.
            if math.isfinite(sum_x2) and not 0 < sum_x2 < _TINY and (sum_x2 == 0) == (peak == 0):
                self.n += x.numel()
                self.sum_x2 += sum_x2
                self.sum_y2 += sum_x2
                self.sum_xy += sum_x2
                self.peak = max(self.peak, peak)
                return self
        return self.update(x, x)

    def _update_float32(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """The common case, ~3x faster than float64: per chunk, float32 products summed pairwise
        (relative error ~1e-8; ``torch.dot``'s running sums reach ~1e-5 on 1 Mi elements), added
        up in Python floats. The max error is that of x - y rounded to float32 (within 2^-24
        relative of the exact one; 0 only where x == y). Returns False, having changed nothing,
        where float32 cannot be trusted: a NaN/Inf in x, y or x - y (squares then sum to NaN/Inf:
        nothing cancels), an overflowing square, or sums so small that squares may have underflowed."""
        e, p = _work(x.numel())
        torch.sub(x, y, out=e)
        sums = [float(torch.mul(a, b, out=p).sum()) for a, b in ((x, x), (y, y), (x, y), (e, e))]
        sum_x2, sum_y2, sum_xy, sum_e2 = sums
        if not all(map(math.isfinite, sums)):
            return False
        xlo, xhi = torch.aminmax(x)
        elo, ehi = torch.aminmax(e)
        peak, max_e = max(-float(xlo), float(xhi)), max(-float(elo), float(ehi))
        if any(0 < v < _TINY for v in (sum_x2, sum_y2, sum_e2)) or (sum_x2 == 0) != (peak == 0) \
                or (sum_e2 == 0) != (max_e == 0) or (sum_y2 == 0 and sum_x2 != sum_e2):
            return False
        self.n += x.numel()
        self.sum_x2 += sum_x2
        self.sum_y2 += sum_y2
        self.sum_xy += sum_xy
        self.sum_e2 += sum_e2
        self.peak = max(self.peak, peak)
        self.max_err = max(self.max_err, max_e)
        return True

    def _update_float64(self, x: torch.Tensor, y: torch.Tensor) -> "ErrorStats":
        x = x.double()
        y = y.double()
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
