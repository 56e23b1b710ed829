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

import math
import threading

import torch

# The encodings' numbers and the granularities live in the torch-free dtype table.
from .dtypes import E4M3FN, E5M2, FP8_FORMATS, FP8Format, Granularity  # noqa: F401  (re-exported)

BLOCK_SIZE = 128


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
        # amin and amax along a dim: aminmax(dim=) is ~20x slower on CPU (torch 2.13).
        return torch.maximum(-x2.amin(dim=1).float(), x2.amax(dim=1).float()).unsqueeze(1)
    rows, cols = x2.shape
    nbr, nbc = -(-rows // BLOCK_SIZE), -(-cols // BLOCK_SIZE)
    if rows % BLOCK_SIZE or cols % BLOCK_SIZE:
        # Pad with zeros to whole tiles: zeros never raise an absmax.
        padded = torch.zeros(nbr * BLOCK_SIZE, nbc * BLOCK_SIZE, dtype=x2.dtype)
        padded[:rows, :cols] = x2
        x2 = padded
    return x2.reshape(nbr, BLOCK_SIZE, nbc, BLOCK_SIZE).abs().amax(dim=(1, 3)).float()


def scale_from_absmax(amax: torch.Tensor, fmt: FP8Format = E4M3FN) -> torch.Tensor:
    """scale = absmax / max_finite in float64, stored as float32.

    An all-zero tensor or block gets scale 1 (never a division by zero). A nonzero absmax so
    small (below ~1e-43) that the scale underflows float32 gets the smallest normal float32
    instead: such values are far below anything FP8 can resolve relative to real weights.
    """
    scale = (amax.double() / fmt.max_finite).float()
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).tiny), scale)


def static_activation_scale(input_range: float, fmt: FP8Format = E4M3FN) -> float:
    """A layer's static activation scale from its calibrated input range: the power of two at or
    above ``range / max_finite`` (a zero range: 1; clamped to float32's normal range).

    Not ``range / max`` itself: activations are x / scale cast to FP8, and a scale that is not a
    power of two moves every value to another place in its binade, which on a bell-shaped input costs
    up to ~0.5 dB of SQNR against scale 1 (measured per layer on diffusers models) for nothing; a power
    of two only shifts exponents, so the quantized values are those of scale 1 with the range moved to
    where the inputs are. It also leaves up to 2x headroom for inputs beyond the calibrated range.

    >>> static_activation_scale(448.0), static_activation_scale(30.3), static_activation_scale(1000.0)
    (1.0, 0.125, 4.0)
    """
    if not input_range > 0:
        return 1.0
    mantissa, exponent = math.frexp(input_range / fmt.max_finite)      # range / max = mantissa * 2**exponent
    exponent -= mantissa == 0.5                                        # already a power of two
    return float(min(max(2.0 ** exponent, torch.finfo(torch.float32).tiny), torch.finfo(torch.float32).max))


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
    return quantize_widened(widen(x, work), scale, granularity, fmt, out=out).view(x.shape)


def widen(x: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 copy of ``x`` as [out, in], in ``work`` (float32, at least x.numel()) if given.

    Widen before dividing: a 0-dim float32 scale does not promote a bf16 tensor, so dividing
    x directly would round the quotient to bf16.
    """
    x2 = as_2d(x)
    n = x2.numel()
    y = (work[:n] if work is not None else torch.empty(n, dtype=torch.float32)).view(x2.shape)
    return y.copy_(x2)


def quantize_widened(y: torch.Tensor, scale: torch.Tensor, granularity: Granularity = Granularity.TENSOR,
                     fmt: FP8Format = E4M3FN, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``quantize`` of a float32 [out, in] copy from ``widen``, which it overwrites (divides in place)."""
    scale = scale.float()
    tiles, per_tile = _broadcast(y, scale, granularity)
    tiles.div_(per_tile)
    y.clamp_(-fmt.max_finite, fmt.max_finite)
    n = y.numel()
    q = (out[:n] if out is not None else torch.empty(n, dtype=fmt.torch_dtype)).view(y.shape)
    return q.copy_(y)


def _broadcast(w: torch.Tensor, scale: torch.Tensor, granularity: Granularity):
    """(w, scale) viewed so that ``w <op>_ scale`` applies each scale to its elements; in-place ops
    on the first reach ``w``. Whole 128x128 tiles broadcast one value per tile without
    materialising a [rows, cols] scale (the same products, element for element)."""
    rows, cols = w.shape
    if (granularity is Granularity.BLOCK and rows % BLOCK_SIZE == 0 and cols % BLOCK_SIZE == 0
            and scale.numel() == (rows // BLOCK_SIZE) * (cols // BLOCK_SIZE)):
        return (w.view(rows // BLOCK_SIZE, BLOCK_SIZE, cols // BLOCK_SIZE, BLOCK_SIZE),
                scale.reshape(rows // BLOCK_SIZE, 1, cols // BLOCK_SIZE, 1))
    return w, expand_scale(scale, rows, cols, granularity)


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: Granularity = Granularity.TENSOR,
               dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """W = q * scale, in ``dtype`` (the product is formed in float32).

    ``out`` (float32, at least q.numel() elements) is an optional preallocated buffer.
    """
    if out is None and dtype in _NARROW:
        w = torch.empty(q.shape, dtype=dtype)
        if dequantize_narrow(q, scale, granularity, w.view(as_2d(q).shape)):
            return w
    scale = scale.float()
    if granularity is Granularity.TENSOR and q.dtype in _FP8_DTYPES:
        # One scale: scale the 256-entry table rather than every element (the same products).
        w = decode(as_2d(q), out, scale=scale.reshape(()))
    else:
        w = decode(as_2d(q), out)
        tiles, per_tile = _broadcast(w, scale, granularity)
        tiles.mul_(per_tile)
    return w.to(dtype).reshape(q.shape)


def dequantize_into(q: torch.Tensor, scale: torch.Tensor, granularity: Granularity, out: torch.Tensor,
                    work: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize`` written into ``out`` (q's shape or element count, any float dtype): E4M3 codes
    into bfloat16 or float16 with one scale per tensor or per row go straight there, with no float32
    copy (``dequantize_narrow``, about half the time); the rest through float32 (``work``: an
    optional float32 buffer of at least q.numel() elements). The same values, bit for bit."""
    w = out.view(as_2d(q).shape)
    if dequantize_narrow(q, scale, granularity, w):
        return out
    if out.dtype == torch.float32:
        work = w.view(-1)
    result = dequantize(q, scale, granularity, torch.float32, out=work)
    if result.data_ptr() != out.data_ptr():          # float32 was written where it belongs already
        out.copy_(result.view(out.shape))
    return out


# E4M3's exponent-and-mantissa bits placed in a narrow float's: (left shift, mask keeping them and
# the sign, the power of two the result is off by). bfloat16 shares float32's exponent: E4M3's 7
# bits at 4..10 read as q * 2^-120 (E4M3's subnormals as bfloat16's). float16: bits 7..13, q / 2^8.
_NARROW = {torch.bfloat16: (4, -0x7810, 2.0 ** 120), torch.float16: (7, -0x4001, 256.0)}


def narrow_route(codes: torch.dtype, granularity: Granularity, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``dequantize_narrow`` takes such a weight (before looking at its scale): E4M3 codes
    into bfloat16 or float16, per tensor or per row, on the CPU."""
    return (codes == E4M3FN.torch_dtype and dtype in _NARROW and granularity is not Granularity.BLOCK
            and device.type == "cpu")


def dequantize_narrow(q: torch.Tensor, scale: torch.Tensor, granularity: Granularity, w: torch.Tensor) -> bool:
    """E4M3 ``q`` times its per-tensor or per-row ``scale`` written into ``w`` ([rows, cols],
    bfloat16 or float16) with three integer passes and one multiply: the codes' bits moved into
    place (sign-extended, shifted, masked), then times scale * 2^k, the product formed in float32 (as
    torch's CPU kernel forms a narrow tensor times a float32 scalar; per row, in 2 MB of float32
    work a group of rows at a time), rounded once into ``w``'s dtype. The products are q * scale
    exactly as float32 forms them (2^k is exact), so the result is ``dequantize``'s bit for bit.
    False (w untouched) where this route does not apply: other codes or dtypes, 128x128 blocks, a
    scale whose 2^k multiple overflows float32, or bfloat16 while denormal inputs read as zero
    (``torch.set_flush_denormal(True)``: E4M3's subnormals become bfloat16 subnormals here)."""
    if not narrow_route(q.dtype, granularity, w.dtype, w.device) or q.numel() == 0:
        return False
    shift, mask, unit = _NARROW[w.dtype]
    factor = scale.float().reshape(-1, 1) * unit
    if not bool(torch.isfinite(factor).all()) or (w.dtype == torch.bfloat16 and _denormals_flushed()):
        return False
    codes = q.contiguous().view(torch.int8).view(w.shape)
    bits = w.view(torch.int16)
    bits.copy_(codes).bitwise_left_shift_(shift).bitwise_and_(mask)
    if granularity is Granularity.TENSOR:
        w.mul_(float(factor))            # a Python float: the kernel multiplies in float32
    else:
        # torch's narrow x float32-tensor product is not vectorized (~2.7 ns an element): a group of rows
        # at a time, widened exactly into float32 work that stays in cache, multiplied, rounded back.
        rows, cols = w.shape
        per = max(1, ROWS_WORK // cols)
        work = _scratch_f32(min(rows, per) * cols)
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            part = work[:(r1 - r0) * cols].view(r1 - r0, cols)
            w[r0:r1].copy_(part.copy_(w[r0:r1]).mul_(factor[r0:r1]))
    # NaN codes are 0x7F (the largest int8) and 0xFF (the largest uint8): two cheap reductions.
    if int(codes.max()) == 0x7F or int(codes.view(torch.uint8).max()) == 0xFF:
        w.masked_fill_(codes.view(torch.uint8).bitwise_and(0x7F) == 0x7F, float("nan"))
    return True


ROWS_WORK = 1 << 19         # float32 elements of per-row work (2 MB): the fastest measured on a 12288x3072 weight


def _scratch_f32(n: int) -> torch.Tensor:
    """A float32 work buffer of ``n`` elements, reused by this thread's later calls."""
    buf = getattr(_SCRATCH, "float32", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.float32 = torch.empty(n, dtype=torch.float32)
    return buf[:n]


_DENORMAL = 2.0 ** -130


def _denormals_flushed() -> bool:
    """True while this thread reads float32 subnormals as zero (``torch.set_flush_denormal(True)``)."""
    return float(torch.full((1,), _DENORMAL).mul_(2.0 ** 10)) != _DENORMAL * 2.0 ** 10


_FP8_DTYPES = tuple(f.torch_dtype for f in FP8_FORMATS.values())
_DECODE_TABLES: dict[torch.dtype, torch.Tensor] = {}
_SCRATCH = threading.local()


def decode(q: torch.Tensor, out: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``q.float()`` (times the 0-dim float32 ``scale`` of FP8 codes, if given), into ``out`` if
    given: the same values, bit for bit, as torch's element-wise cast (and product), ~10x faster.

    The codes are widened to float16 with integer shifts, then to float32 in one vectorized cast.
    E5M2's bits are the top byte of a float16's. E4M3's exponent-and-mantissa bits, shifted to the
    same place in a float16 (bias 15, not 7), encode every E4M3 value divided by 2^8, subnormals
    included (both formats' subnormals step by 2^-3 of their smallest normal); the product by
    2^8 (times the scale) is exact, or rounded once as the cast's is. E4M3 has no infinity: its
    NaN codes (S.1111.111) would become 1.875, so they are looked for first and made NaN.
    """
    n = q.numel()
    w = (out[:n] if out is not None else torch.empty(n, dtype=torch.float32)).view(q.shape)
    if q.dtype not in _FP8_DTYPES:
        if scale is not None:
            raise ValueError(f"decode: a scale applies to FP8 codes, not {q.dtype}")
        return w.copy_(q)
    codes = q.contiguous().view(torch.uint8).reshape(-1)
    flat = w.view(-1)
    if q.dtype == E5M2.torch_dtype:
        bits = _scratch(n)
        bits.copy_(codes).bitwise_left_shift_(8)          # int16 wraps: the sign lands on bit 15
        flat.copy_(bits.view(torch.float16))
        if scale is not None:
            flat.mul_(scale)
        return w
    if q.dtype == E4M3FN.torch_dtype:
        bits = _scratch(n)
        magnitude = torch.bitwise_and(codes, 0x7F, out=bits.view(torch.uint8)[:n])   # (bits' memory, free yet)
        has_nan = n > 0 and int(magnitude.max()) == 0x7F
        # Sign-extended codes shifted by 7: exponent and mantissa in bits 7..13, the sign in 15 (and 14: cleared).
        bits.copy_(codes.view(torch.int8)).bitwise_left_shift_(7).bitwise_and_(-0x4001)
        flat.copy_(bits.view(torch.float16))
        factor = None if scale is None else scale.float().reshape(()) * 256.0
        if factor is None or not bool(torch.isfinite(factor)):
            flat.mul_(256.0)
            if scale is not None:
                flat.mul_(scale)
        else:
            flat.mul_(factor)
        if has_nan:
            flat.masked_fill_(codes.bitwise_and(0x7F) == 0x7F, float("nan"))
        return w
    table = _DECODE_TABLES.get(q.dtype)
    if table is None:
        table = _DECODE_TABLES[q.dtype] = torch.arange(256, dtype=torch.uint8).view(q.dtype).float()
    if scale is not None:
        table = table * scale
    torch.index_select(table, 0, codes.long(), out=flat)
    return w


def _scratch(n: int) -> torch.Tensor:
    """An int16 work buffer of ``n`` elements, reused by this thread's later calls (a fresh one
    page-faults every time)."""
    buf = getattr(_SCRATCH, "int16", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.int16 = torch.empty(max(n, 1 << 16), dtype=torch.int16)
    return buf[:n]


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
