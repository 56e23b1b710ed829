"""Weights at rest as stored: FP8 codes and scale, or a kept weight in its stored dtype, made on use.

A quantized ``weight`` (of an ``nn.Linear``, a convolution, anything) leaves the module's parameters;
the module keeps two buffers instead, ``weight_fp8`` (the stored FP8 codes) and ``weight_scale``
(the stored scale), and its class becomes a subclass (``FP8Linear`` for ``nn.Linear``) in which
``weight`` is a property: every read dequantizes (W = q * scale) into the compute dtype, on the
codes' device. A kept weight stored in another dtype than the compute dtype (a BF16 embedding of
a model run in float32) is held the same way, as ``weight_stored``, and cast on every read
(``CastEmbedding``): memory at rest stays the file's size. The module's own ``forward`` runs
unchanged, so any layer type works, and code that reads ``layer.weight`` outside ``forward``
still gets the right values. Moving the model (``.to(device)``) moves the buffers; the weight is
made where they are.

    >>> layer.weight_fp8.dtype, layer.weight.dtype              # doctest: +SKIP
    (torch.float8_e4m3fn, torch.float32)

Kernel paths (``KERNELS``): on CPU the product is ``quantkit.fp8.dequantize``'s (E4M3 bits moved
into the compute dtype's, or widened through float16: the very values ``load_dequantized`` makes,
hence bit-identical results); on any
other device ``q.float() * scale`` (the same products, exact in float32). With ``matmul="fp8"``
an ``nn.Linear`` holding E4M3 codes multiplies them as they are with ``torch._scaled_mm`` (CPU, and
CUDA on FP8-capable GPUs), its input quantized per call (``scaled_forward``): W8A8 numerics, not
bit-identical to the dequantize path.

Activations (``InputQuant``): an ``nn.Linear`` holding FP8 codes can also quantize its input to E4M3
and back before its own op (``quantized_input``: x -> clamp(x / s, -448, 448) -> E4M3 -> * s, in
float32), with a static scale (the file's ``input_scale``, or 1.0 as ComfyUI assumes without one)
or a dynamic one per token (row). That is fake quantization: on CPU, in float32, the numbers an
FP8 matmul on a GPU computes, up to the order of the sums (``scaled_forward`` takes the same scales).
"""
from __future__ import annotations

import dataclasses
import enum
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch

from .. import fp8 as fp8math
from ..fp8 import Granularity

CODES, SCALE = "_fp8", "_scale"      # buffer suffixes: weight -> weight_fp8, weight_scale
STORED = "_stored"                   # a kept weight in its stored dtype: weight -> weight_stored
KERNELS = {
    "cpu": "dequantize per call (quantkit.fp8.dequantize_into: E4M3 bits into the compute dtype's) "
           "+ the layer's own op",
    "device": "dequantize per call (q.float() * scale on the codes' device) + the layer's own op",
    "scaled_mm": "FP8 matmul (torch._scaled_mm): stored E4M3 codes and scale as they are, activations "
                 "quantized per call to E4M3 with a dynamic per-tensor scale",
}
MATMULS = ("dequantize", "fp8")


class Activations(enum.Enum):
    """How ``load`` quantizes the inputs of ``nn.Linear`` layers whose weights are FP8."""

    NONE = "none"         # weight-only: inputs as they come (ComfyUI's full_precision_matrix_mult)
    FILE = "file"         # as the file implies for each layer, as its client runs it (Placement.implied)
    UNIT = "unit"         # scale 1.0 everywhere: ComfyUI's FP8 matmul without an input_scale (clamp to +-448)
    DYNAMIC = "dynamic"   # per token (row of the input): absmax / 448 at every call


@dataclass(frozen=True)
class InputQuant:
    """An FP8 Linear's input quantization: a static ``scale`` (positive, finite) or, with None,
    a dynamic scale per token; into ``fmt`` (E4M3, or E5M2 where the client quantizes an E5M2
    layer's input in E5M2, as ComfyUI does)."""

    scale: float | None
    fmt: fp8math.FP8Format = fp8math.E4M3FN

    @property
    def scheme(self) -> str:
        return "dynamic" if self.scale is None else "unit" if self.scale == 1.0 else "static"


@dataclass(frozen=True)
class Held:
    """How a module makes one tensor it holds as stored: dequantized (``granularity`` set) or cast,
    into ``dtype``."""

    dtype: torch.dtype
    granularity: Granularity | None = None
    matmul: str = "dequantize"        # "fp8": an nn.Linear multiplies FP8 codes directly (scaled_forward)
    input: InputQuant | None = None   # an nn.Linear's input quantized to E4M3 first (None: as it comes)


class Slot:
    """The CPU buffer a model's weights are dequantized into, reused while nothing else holds it.

    A fresh tensor the size of one of FLUX's linears costs more in page faults (the kernel zeroing
    each new page, ~1 ns an element) than dequantizing into it (~0.4 ns): ``take`` hands out the
    buffer again once every tensor made in it is gone (its storage referenced by the slot alone),
    a fresh one otherwise, and keeps the largest. What it holds is the budget's ``work`` term, the
    largest weight in the compute dtype, held between calls rather than made on each."""

    def __init__(self):
        self._buf: torch.Tensor | None = None
        self._lock = threading.Lock()

    def __reduce__(self):                # a copied or pickled model gets an empty slot of its own
        return Slot, ()

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            buf = self._buf
            if buf is not None and buf.dtype == dtype and buf.numel() >= numel and _alone(buf):
                return buf[:numel]
            fresh = torch.empty(numel, dtype=dtype)
            if buf is None or buf.dtype != dtype or numel > buf.numel():
                self._buf = fresh
            return fresh


def _alone(buf: torch.Tensor) -> bool:
    """No tensor but ``buf`` uses its storage (the count includes the storage object asked for here)."""
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2


@dataclass
class KernelLog:
    """How many weights each kernel path produced (``RuntimeInfo.kernels``), and the model's
    ``Slot`` its CPU weights are made in."""

    counts: Counter = field(default_factory=Counter)
    slot: Slot = field(default_factory=Slot, repr=False, compare=False)


CHUNK_ELEMENTS = 1 << 22    # elements dequantized at once: 16 MB of float32 work, 8 MB of int16 scratch


def dequantized(codes: torch.Tensor, scale: torch.Tensor, granularity: Granularity, dtype: torch.dtype,
                log: KernelLog | None = None, chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """W = codes * scale in ``dtype``, the product formed in float32 (as ``quantkit.fp8.dequantize``),
    written into ``dtype`` directly: E4M3 codes into bfloat16 or float16 (per tensor or per row) in
    place with no other temporary (``fp8.dequantize_into``); the rest ``chunk`` elements (whole
    rows; whole 128-row tiles for block scales) at a time, the temporaries one chunk's float32 and
    int16 work, not a float32 copy of the whole weight. What dequantization adds to memory is the
    weight in ``dtype`` and at most ~24 MB. Each row's products are the same as the whole weight's
    at once (bit for bit). With ``log``, CPU weights are made in the model's ``Slot``."""
    q = fp8math.as_2d(codes)
    rows, cols = q.shape
    step = fp8math.block_rows(granularity)
    per = max(step, (chunk // max(cols, 1)) // step * step)
    on_cpu = codes.device.type == "cpu"
    if on_cpu and log is not None:
        w = log.slot.take(rows * cols, dtype).view(rows, cols)
    else:
        w = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    if on_cpu and fp8math.dequantize_narrow(q, scale, granularity, w):       # whole, in place, no float32 work
        if log is not None:
            log.counts["cpu"] += 1
        return w.reshape(codes.shape)
    work = None if dtype == torch.float32 else torch.empty(min(rows, per) * cols, dtype=torch.float32,
                                                          device=codes.device)
    scale = scale.float()
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        part, part_scale = q[r0:r1], fp8math.scale_rows(scale, granularity, r0, r1)
        target = w[r0:r1]
        if on_cpu:
            fp8math.dequantize_into(part, part_scale, granularity, target, work=work)
        else:
            target.copy_(part.float() * fp8math.expand_scale(part_scale, r1 - r0, cols, granularity))
    if log is not None:
        log.counts["cpu" if on_cpu else "device"] += 1
    return w.reshape(codes.shape)


def input_scales(x: torch.Tensor, quant: InputQuant) -> torch.Tensor:
    """The float32 scale of each of ``x``'s rows (shape [..., 1]) or the static one (shape [])."""
    if quant.scale is not None:
        return torch.tensor(quant.scale, dtype=torch.float32)
    # Per token: one absmax per row of the last dimension, scale = absmax / max (all-zero row: 1).
    rows = fp8math.absmax(x.reshape(-1, x.shape[-1]), Granularity.CHANNEL)
    return fp8math.scale_from_absmax(rows, quant.fmt).reshape(*x.shape[:-1], 1)


def input_codes(x: torch.Tensor, scale: torch.Tensor, fmt: fp8math.FP8Format = fp8math.E4M3FN) -> torch.Tensor:
    """FP8 codes of x / scale, divided in float32 and saturated at +-max before the cast (the
    cast alone would turn anything past E4M3's 464 into NaN)."""
    return (x.float() / scale).clamp_(-fmt.max_finite, fmt.max_finite).to(fmt.torch_dtype)


def quantized_input(x: torch.Tensor, quant: InputQuant) -> torch.Tensor:
    """``x`` quantized to E4M3 with ``quant``'s scale and back (codes * scale in float32), in x's dtype.

    >>> quantized_input(torch.tensor([[0.3, 500.0, -1e4]]), InputQuant(1.0)).tolist()
    [[0.3125, 448.0, -448.0]]
    >>> quantized_input(torch.tensor([[0.3, 500.0, -1e4]]), InputQuant(None)).tolist()[0][2]
    -10000.0
    """
    scale = input_scales(x, quant)
    return (input_codes(x, scale, quant.fmt).float() * scale).to(x.dtype)


def input_quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` on the input quantized to E4M3 and back (fake quantization, any device)."""
    held = self.__dict__["_quantkit_held"]["weight"]
    return torch.nn.Linear.forward(self, quantized_input(x, held.input))


def converted_dtype(fn) -> torch.dtype | None:
    """The floating-point dtype ``fn`` (what ``Module._apply`` maps over tensors: ``.to(dtype)``,
    ``.half()``, ``.float()``...) converts tensors to, or None for a move that keeps dtypes
    (``.to("cpu")``). Probed on two empty tensors: a conversion to float16 leaves a float16 one as it is.
    A dtype layers cannot compute in is refused (``compute_dtype``'s rule)."""
    probes = [fn(torch.empty(0, dtype=d)).dtype for d in (torch.float16, torch.float32)]
    dtype = probes[0] if probes[0] != torch.float16 else probes[1] if probes[1] != torch.float32 else None
    if dtype is not None:
        check_compute_dtype(dtype, "the compute dtype of a model quantkit.runtime loaded, converted to")
    return dtype


def check_compute_dtype(dtype, what: str = "compute_dtype") -> None:
    """A dtype layers compute in: floating point, 16 bits or more (FP8 codes stay as stored)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"{what} {dtype!r}: use a floating-point dtype of 16 bits or more "
                         "(torch.bfloat16, torch.float16, torch.float32); FP8 weights stay FP8 as stored")


def moved_device(fn, t: torch.Tensor) -> torch.device:
    """The device ``fn`` moves a tensor on ``t``'s device to."""
    return fn(torch.empty(0, dtype=torch.float32, device=t.device)).device


def held_apply(self, fn, recurse: bool = True):
    """``Module._apply`` (``.to(dtype)``, ``.half()``, ``.to(device)``...) for a module holding tensors
    as stored: FP8 codes, their float32 scales and kept weights keep their dtype and only move
    device (meta placeholders of streamed mode stay as they are); a dtype conversion becomes the
    compute dtype every held tensor is made in. The module's other tensors convert as usual."""
    held = self.__dict__["_quantkit_held"]
    dtype = converted_dtype(fn)
    keys = [n + suffix for n, h in held.items() for suffix in ((CODES, SCALE) if h.granularity is not None
                                                               else (STORED,))]
    kept = {k: self._buffers.pop(k) for k in keys if k in self._buffers}
    try:
        super(type(self), self)._apply(fn, recurse)
    finally:
        for k, t in kept.items():
            self._buffers[k] = t if t.is_meta else t.to(moved_device(fn, t))
    if dtype is not None:
        for name, h in held.items():
            held[name] = dataclasses.replace(h, dtype=dtype)
    return self


_CLASSES: dict[tuple[type, frozenset, bool, bool, bool], type] = {}


def _held_class(cls: type, names: frozenset, fp8: bool, scaled: bool = False, input_quantized: bool = False) -> type:
    """``cls`` with each of ``names`` a property made from what is held (one class per key); with
    ``scaled`` (an nn.Linear whose weight is FP8), a forward that multiplies the codes in FP8;
    with ``input_quantized``, a forward that quantizes the input first (``input_quantized_forward``)."""
    key = (cls, names, fp8, scaled, input_quantized)
    if key not in _CLASSES:
        props = {name: property(_getter(name), doc=f"{name}, made on each read from what the module holds")
                 for name in names}
        if scaled:
            props["forward"] = scaled_forward
        elif input_quantized:
            props["forward"] = input_quantized_forward
        prefix = "FP8" if fp8 else "Cast"
        _CLASSES[key] = type(prefix + cls.__name__, (cls,), {
            **props, "_apply": held_apply, "__module__": __name__,
            "__doc__": f"{cls.__name__} holding {', '.join(sorted(names))} as stored, made on each read"})
    return _CLASSES[key]


def scaled_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` as an FP8 matmul: the stored E4M3 codes and scale are used as they are
    (never re-quantized); the input is quantized to E4M3 with the layer's ``InputQuant`` (the
    file's static scale, 1.0, or per token) or, without one, a dynamic per-tensor scale (absmax /
    448, computed in float32), clamped before the cast, and ``torch._scaled_mm`` forms
    x_q @ W_q^T * scale_x * scale_w in float32, written out in the compute dtype. Falls back to the
    dequantize path (the input still quantized as asked) where the kernel cannot take the layer
    (E5M2 codes, 128x128 block scales, or on CUDA dimensions that are not multiples of 16)."""
    held = self.__dict__["_quantkit_held"]["weight"]
    codes, scale = self._buffers["weight" + CODES], self._buffers["weight" + SCALE]
    rows, cols = codes.shape
    if (codes.dtype != torch.float8_e4m3fn or held.granularity is Granularity.BLOCK
            or (codes.device.type == "cuda" and (rows % 16 or cols % 16))):
        return input_quantized_forward(self, x) if held.input is not None else torch.nn.Linear.forward(self, x)
    log = self.__dict__.get("_quantkit_log")
    if log is not None:
        log.counts["scaled_mm"] += 1
    x2 = x.reshape(-1, cols)
    if held.input is not None:
        sx = input_scales(x2, held.input).to(x2.device)
    else:       # the activation's scale, like the weights': absmax / 448 (an all-zero input gets 1)
        sx = fp8math.scale_from_absmax(fp8math.absmax(x2, Granularity.TENSOR), fp8math.E4M3FN)
    xq = input_codes(x2, sx)
    if held.granularity is Granularity.CHANNEL or sx.dim():   # a scale per output row or per token: row-wise
        sa = sx.reshape(-1, 1).expand(x2.shape[0], 1).contiguous()
        sw = scale.float().reshape(-1, 1).expand(rows, 1).reshape(1, rows).contiguous()
    else:
        sa, sw = sx.reshape(()), scale.float().reshape(())
    out = torch._scaled_mm(xq, codes.t(), scale_a=sa, scale_b=sw, out_dtype=held.dtype)
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], rows)


def _getter(name: str):
    def get(self):
        held = self.__dict__["_quantkit_held"][name]
        if held.granularity is None:
            return self._buffers[name + STORED].to(held.dtype)
        return dequantized(self._buffers[name + CODES], self._buffers[name + SCALE], held.granularity, held.dtype,
                           self.__dict__.get("_quantkit_log"))
    return get


def make_quantized(module: torch.nn.Module, name: str, codes: torch.Tensor, scale: torch.Tensor,
                   granularity: Granularity, dtype: torch.dtype, log: KernelLog | None = None,
                   matmul: str = "dequantize", input_quant: InputQuant | None = None) -> None:
    """Replace ``module.<name>`` (a parameter) by FP8 ``codes`` and ``scale`` buffers, read back as a
    property in ``dtype``. The old parameter is dropped (freed if nothing else holds it).
    ``matmul="fp8"``: an ``nn.Linear``'s weight is multiplied as FP8 (``scaled_forward``);
    ``input_quant``: an ``nn.Linear``'s input is quantized to E4M3 first."""
    if log is not None:
        module.__dict__["_quantkit_log"] = log
    _hold(module, name, Held(dtype, granularity, matmul, input_quant), {CODES: codes, SCALE: scale})


def make_cast(module: torch.nn.Module, name: str, stored: torch.Tensor, dtype: torch.dtype) -> None:
    """Replace ``module.<name>`` by a ``<name>_stored`` buffer (``stored`` as it is), read back as a
    property cast to ``dtype``."""
    _hold(module, name, Held(dtype), {STORED: stored})


def _hold(module, name: str, held: Held, buffers: dict) -> None:
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    specs = module.__dict__.setdefault("_quantkit_held", {})
    specs[name] = held
    for suffix, t in buffers.items():
        module.register_buffer(name + suffix, t)
    base = type(module).__bases__[0] if type(module) in _CLASSES.values() else type(module)
    fp8 = any(h.granularity is not None for h in specs.values())
    weight = specs.get("weight")
    linear_fp8 = issubclass(base, torch.nn.Linear) and weight is not None and weight.granularity is not None
    scaled = linear_fp8 and weight.matmul == "fp8"
    module.__class__ = _held_class(base, frozenset(specs), fp8, scaled, linear_fp8 and weight.input is not None)


def held_buffer(module: torch.nn.Module, name: str) -> str | None:
    """The buffer holding the stored data of ``module.<name>`` (codes or stored weight), or None."""
    held = module.__dict__.get("_quantkit_held", {}).get(name)
    if held is None:
        return None
    return name + (STORED if held.granularity is None else CODES)
