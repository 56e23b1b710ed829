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

``rtn_sqnr_bound`` is the least SQNR round-to-nearest FP8 with absmax scales can give a tensor
(validate's default sanity floor); ``ScaleFit`` measures how well given scales fit a weight
(values clipped at the FP8 maximum, or a range far above the weight's own).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from .dtypes import FP8Format


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


def peak_to_rms_db(n: int, sum_x2: float, peak: float) -> float:
    """10 log10(peak^2 / mean x^2): how far a tensor's largest value sits above its typical one
    (PSNR - SQNR of any reconstruction of it); inf for an all-zero tensor."""
    return 10 * math.log10(peak ** 2 * n / sum_x2) if sum_x2 > 0 else math.inf


# validate's default per-tensor floor sits this far below rtn_sqnr_bound: the bound already assumes every
# value at its worst rounding (real weights land ~7 dB above it in E4M3), so a correct conversion never
# comes near; a scale that clips the weights (stats of other weights, a percentile of a fraction) or
# zeroes them does. calibrate warns of a clipped weight statistic against the same floor.
FLOOR_MARGIN_DB = 3.0


def rtn_sqnr_bound(peak_to_rms: float, fmt: FP8Format) -> float:
    """The least SQNR (dB) that round-to-nearest ``fmt`` with each scale group's absmax as its scale
    (scale = absmax / max) can give a tensor whose peak-to-RMS ratio is ``peak_to_rms`` dB: what
    a correct conversion always reaches, whatever its data.

    Per element, x / scale lies within [-max, max] (absmax scale: nothing clips). In the normal
    range the nearest code is within half a step, 2^-(m+1) of |x| (m mantissa bits: 2^-4 for
    E4M3, 2^-3 for E5M2); below the smallest normal, within half the subnormal step (in units of
    the scale: min_subnormal / 2). So e^2 <= 2^-2(m+1) x^2 + (min_subnormal / 2 * scale)^2, and
    with scale <= peak / max over every group, sum e^2 / sum x^2 <= 2^-2(m+1) +
    (min_subnormal / (2 max))^2 * peak^2 / mean x^2. E4M3: 24.1 dB while peak / RMS stays under
    ~10^4 (real weights: 15-45 dB of it; measured round-to-nearest gives ~31.5 dB there, the
    bound assumes every value at its worst). Rounding is never worse than 0 (|e| <= |x|): the
    bound is at least 0 dB.

    >>> from quantkit.dtypes import E4M3FN, E5M2
    >>> round(rtn_sqnr_bound(20.0, E4M3FN), 2), round(rtn_sqnr_bound(20.0, E5M2), 2)
    (24.08, 18.06)
    """
    if math.isinf(peak_to_rms):
        return math.inf
    relative = 2.0 ** (-2 * (fmt.mantissa_bits + 1))
    floor_step = (fmt.min_subnormal / (2 * fmt.max_finite)) ** 2 * 10 ** (peak_to_rms / 10)
    return max(0.0, -10 * math.log10(relative + floor_step))


@dataclass
class ScaleFit:
    """How given scales fit a weight, fed chunk by chunk (float32 [rows, cols] holding whole scale
    groups, with the scales of those rows): values beyond scale * max are clipped to the FP8
    maximum, and a scale group whose largest value maps far below the maximum wastes FP8's range
    (every value rounds to 0 when it maps below half the smallest subnormal).

    >>> from quantkit.dtypes import E4M3FN, Granularity
    >>> fit = ScaleFit(E4M3FN)
    >>> fit.update(torch.tensor([[1.0, -4.0]]), torch.tensor(2.0 / 448), Granularity.TENSOR)
    >>> fit.clipped, round(fit.clipped_fraction, 2), round(fit.clip_sqnr, 2)
    (1, 0.5, 6.28)
    """

    fmt: FP8Format
    n: int = 0
    sum_x2: float = 0.0
    clipped: int = 0           # values beyond the FP8 maximum of their group's scale
    clip_e2: float = 0.0       # their squared error (|x| - scale * max)^2
    fill: float | None = None  # min over nonzero groups of absmax / (scale * max): 1 fits, << 1 wastes range

    def update(self, x: torch.Tensor, scale: torch.Tensor, granularity) -> None:
        from .fp8 import absmax, expand_scale
        sum_x2 = float(torch.dot(x.reshape(-1), x.reshape(-1)))
        if not math.isfinite(sum_x2):           # NaN/Inf kept by --allow-nonfinite: not a fit question
            return
        limit = scale.float() * self.fmt.max_finite
        amax = absmax(x, granularity)
        nonzero = amax > 0
        if bool(nonzero.any()):
            fill = float((amax[nonzero] / limit.expand_as(amax)[nonzero]).amin())
            self.fill = fill if self.fill is None else min(self.fill, fill)
        self.n += x.numel()
        self.sum_x2 += sum_x2
        # The per-element pass only where a group's absmax passes its limit by more than the top step's
        # half (2^-(m+1)): a scale from the absmax itself, rounded in float32 or to a stored dtype, may
        # sit a hair below it, and clamping by that much is within FP8's own rounding.
        if bool((amax > limit * (1 + 2.0 ** -(self.fmt.mantissa_bits + 1))).any()):
            beyond = (x.abs() - expand_scale(limit, x.shape[0], x.shape[1], granularity)).clamp_(min=0)
            self.clipped += int((beyond > 0).sum())
            self.clip_e2 += float(torch.dot(beyond.reshape(-1), beyond.reshape(-1)))

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / self.n if self.n else 0.0

    @property
    def clip_sqnr(self) -> float:
        """The SQNR (dB) the clipping alone leaves (inf: nothing clipped)."""
        if self.clip_e2 == 0:
            return math.inf
        return 10 * math.log10(self.sum_x2 / self.clip_e2) if self.sum_x2 > 0 else -math.inf

    @property
    def zeroed(self) -> bool:
        """Some scale group's values all round to 0 (its largest maps below half the smallest subnormal)."""
        return self.fill is not None and self.fill * self.fmt.max_finite < self.fmt.min_subnormal / 2
