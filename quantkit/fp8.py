"""FP8 math as small pure functions: absmax -> scale -> quantize -> dequantize.

Conventions (shared by ComfyUI, compressed-tensors, torchao):
    scale = absmax / max_finite        (float32, computed in float64)
    q     = cast(clamp(x / scale, -max_finite, +max_finite))    round-to-nearest-even
    W     = q * scale

Granularity decides the shape of absmax and scale for a weight of shape [out, ...]
(every dimension after the first is flattened into "in"):
    TENSOR  -> []                                   one scale for the whole tensor
    CHANNEL -> [out, 1]                             one scale per output row
    BLOCK   -> [ceil(out/128), ceil(in/128)]        one scale per 128x128 tile (edge tiles smaller)
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

BLOCK_SIZE = 128


@dataclass(frozen=True)
class FP8Format:
    """One FP8 encoding, described once. The numbers are the OCP FP8 spec's."""

    name: str                 # torch / ComfyUI spelling
    safetensors_dtype: str    # the header's dtype string
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_finite: float
    min_normal: float
    min_subnormal: float
    has_inf: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.name)


#                  name              header     e  m  bias  max      min normal  min subnormal  inf
E4M3FN = FP8Format("float8_e4m3fn", "F8_E4M3", 4, 3, 7,    448.0,   2.0 ** -6,  2.0 ** -9,     False)
E5M2 = FP8Format("float8_e5m2",     "F8_E5M2", 5, 2, 15,   57344.0, 2.0 ** -14, 2.0 ** -16,    True)

FP8_FORMATS = {f.name: f for f in (E4M3FN, E5M2)}


class Granularity(enum.Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """View a weight as [out, in]: conv kernels flatten their trailing dims into "in"."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))   # not -1: torch refuses it for 0 rows


def scale_shape(shape: tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
    """Shape of the scale tensor for a weight of ``shape``."""
    if granularity is Granularity.TENSOR:
        return ()
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    if granularity is Granularity.CHANNEL:
        return (rows, 1)
    return (-(-rows // BLOCK_SIZE), -(-cols // BLOCK_SIZE))


def absmax(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """max |x| per tensor / row / 128x128 block, as float32. NaN propagates (callers check).

    >>> absmax(torch.tensor([[1.0, -3.0], [2.0, 0.5]]), Granularity.CHANNEL).flatten().tolist()
    [3.0, 2.0]
    """
    if granularity is Granularity.TENSOR:
        # aminmax is one pass without materialising |x| (about 10x faster than abs().amax() on bf16).
        lo, hi = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
        return torch.maximum(-lo.float(), hi.float())
    x2 = as_2d(x)
    if x2.shape[1] == 0:
        return torch.zeros(scale_shape(tuple(x.shape), granularity), dtype=torch.float32)
    if granularity is Granularity.CHANNEL:
        lo, hi = torch.aminmax(x2, dim=1)
        return torch.maximum(-lo.float(), hi.float()).unsqueeze(1)
    rows, cols = x2.shape
    nbr, nbc = -(-rows // BLOCK_SIZE), -(-cols // BLOCK_SIZE)
    # Pad with zeros to whole tiles: zeros never raise an absmax.
    padded = torch.zeros(nbr * BLOCK_SIZE, nbc * BLOCK_SIZE, dtype=x2.dtype)
    padded[:rows, :cols] = x2
    tiles = padded.view(nbr, BLOCK_SIZE, nbc, BLOCK_SIZE)
    return tiles.abs().amax(dim=(1, 3)).float()


def scale_from_absmax(amax: torch.Tensor, fmt: FP8Format = E4M3FN) -> torch.Tensor:
    """scale = absmax / max_finite in float64, stored as float32.

    An all-zero tensor or block gets scale 1 (never a division by zero). A nonzero absmax so
    small (below ~1e-43) that the scale underflows float32 gets the smallest normal float32
    instead: such values are far below anything FP8 can resolve relative to real weights.
    """
    scale = (amax.double() / fmt.max_finite).float()
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).tiny), scale)


def expand_scale(scale: torch.Tensor, rows: int, cols: int, granularity: Granularity) -> torch.Tensor:
    """Broadcast a scale to the [rows, cols] view of its weight (block tiles cut at the edges)."""
    if granularity is Granularity.TENSOR:
        return scale.reshape(())
    if granularity is Granularity.CHANNEL:
        return scale.reshape(rows, 1)
    by_col = scale.repeat_interleave(BLOCK_SIZE, dim=1)[:, :cols]
    if by_col.shape[0] == 1:
        return by_col  # one tile row: [1, cols] broadcasts over the chunk's rows
    return by_col.repeat_interleave(BLOCK_SIZE, dim=0)[:rows]


def quantize(x: torch.Tensor, scale: torch.Tensor, granularity: Granularity = Granularity.TENSOR,
             fmt: FP8Format = E4M3FN, *, out: torch.Tensor | None = None,
             work: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 codes of ``x`` for a given scale, same shape as ``x``.

    The division runs in float32 (exact for bf16/fp16 inputs, correctly rounded), then an
    explicit clamp: torch >= 2.12 saturates on cast but older torch and ml_dtypes produce NaN
    for overflow, so the cast is never trusted with out-of-range values. NaN stays NaN.

    ``out`` (FP8, at least x.numel() elements) and ``work`` (float32, as many) are optional
    preallocated buffers: the streaming quantizer reuses them chunk after chunk, which is
    several times faster than allocating fresh temporaries (page faults dominate otherwise).
    """
    x2 = as_2d(x)
    n = x2.numel()
    y = (work[:n] if work is not None else torch.empty(n, dtype=torch.float32)).view(x2.shape)
    # Widen first: a 0-dim float32 scale does not promote a bf16 tensor, so dividing x2
    # directly would round the quotient to bf16.
    y.copy_(x2)
    y.div_(expand_scale(scale.float(), x2.shape[0], x2.shape[1], granularity))
    y.clamp_(-fmt.max_finite, fmt.max_finite)
    q = (out[:n] if out is not None else torch.empty(n, dtype=fmt.torch_dtype)).view(x2.shape)
    q.copy_(y)
    return q.view(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: Granularity = Granularity.TENSOR,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = q * scale, in ``dtype`` (the product is formed in float32)."""
    q2 = as_2d(q).float()
    w = q2 * expand_scale(scale.float(), q2.shape[0], q2.shape[1], granularity)
    return w.to(dtype).reshape(q.shape)


def block_rows(granularity: Granularity) -> int:
    """Row alignment a chunk of a weight must respect so each chunk holds whole scale rows."""
    return BLOCK_SIZE if granularity is Granularity.BLOCK else 1


def scale_rows(scale: torch.Tensor, granularity: Granularity, row_start: int, row_end: int) -> torch.Tensor:
    """The part of a weight's scale that covers rows [row_start, row_end) (a chunk)."""
    if granularity is Granularity.TENSOR:
        return scale
    if granularity is Granularity.CHANNEL:
        return scale[row_start:row_end]
    return scale[row_start // BLOCK_SIZE: -(-row_end // BLOCK_SIZE)]
