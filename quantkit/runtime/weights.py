"""FP8 weights at rest: a module keeps the stored codes and scale, and its weight is dequantized on use.

A quantized ``weight`` (of an ``nn.Linear``, a convolution, anything) leaves the module's parameters;
the module keeps two buffers instead, ``weight_fp8`` (the stored FP8 codes) and ``weight_scale``
(the stored scale), and its class becomes a subclass (``FP8Linear`` for ``nn.Linear``) in which
``weight`` is a property: every read dequantizes (W = q * scale) into the compute dtype, on the
codes' device. The module's own ``forward`` runs unchanged, so any layer type works, and code
that reads ``layer.weight`` outside ``forward`` still gets the right values. Moving the model
(``.to(device)``) moves the codes and scales; the weight is made where they are.

    >>> layer.weight_fp8.dtype, layer.weight.dtype              # doctest: +SKIP
    (torch.float8_e4m3fn, torch.float32)

Kernel paths (``KERNELS``): on CPU the product is ``quantkit.fp8.dequantize`` itself (a 256-entry
table lookup, the very function ``load_dequantized`` uses, hence bit-identical results); on any
other device ``q.float() * scale`` (the same products, exact in float32). An FP8 matmul path
(torch._scaled_mm / torchao Float8Tensor on CUDA SM >= 8.9) would go in ``dequantized``'s place:
see ``KERNELS`` and the package docstring for why it is not there yet.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .. import fp8 as fp8math
from ..fp8 import Granularity

CODES, SCALE = "_fp8", "_scale"      # buffer suffixes: weight -> weight_fp8, weight_scale
KERNELS = {
    "cpu": "dequantize per call (quantkit.fp8.dequantize, table lookup) + the layer's own op",
    "device": "dequantize per call (q.float() * scale on the codes' device) + the layer's own op",
}


@dataclass
class QuantizedTensor:
    """What a module needs to make one quantized tensor: its granularity and the compute dtype."""

    granularity: Granularity
    dtype: torch.dtype


@dataclass
class KernelLog:
    """How many weights each kernel path produced (``RuntimeInfo.kernels``)."""

    counts: Counter = field(default_factory=Counter)


def dequantized(codes: torch.Tensor, scale: torch.Tensor, granularity: Granularity, dtype: torch.dtype,
                log: KernelLog | None = None) -> torch.Tensor:
    """W = codes * scale in ``dtype``, the product formed in float32 (as ``quantkit.fp8.dequantize``)."""
    if codes.device.type == "cpu":
        path = "cpu"
        w = fp8math.dequantize(codes, scale, granularity, dtype)
    else:
        path = "device"
        q = fp8math.as_2d(codes).float()
        rows, cols = q.shape
        w = (q * fp8math.expand_scale(scale.float(), rows, cols, granularity)).to(dtype).reshape(codes.shape)
    if log is not None:
        log.counts[path] += 1
    return w


_CLASSES: dict[tuple[type, frozenset], type] = {}


def _fp8_class(cls: type, names: frozenset) -> type:
    """``cls`` with each of ``names`` a property that dequantizes (one class per (cls, names))."""
    key = (cls, names)
    if key not in _CLASSES:
        props = {name: property(_getter(name), doc=f"{name}, dequantized from {name}{CODES} * {name}{SCALE}")
                 for name in names}
        _CLASSES[key] = type(f"FP8{cls.__name__}", (cls,), {**props, "__module__": __name__,
                                                            "__doc__": f"{cls.__name__} with FP8 {', '.join(sorted(names))} at rest"})
    return _CLASSES[key]


def _getter(name: str):
    def get(self):
        spec = self.__dict__["_quantkit_fp8"][name]
        return dequantized(self._buffers[name + CODES], self._buffers[name + SCALE], spec.granularity, spec.dtype,
                           self.__dict__.get("_quantkit_log"))
    return get


def make_quantized(module: torch.nn.Module, name: str, codes: torch.Tensor, scale: torch.Tensor,
                   granularity: Granularity, dtype: torch.dtype, log: KernelLog | None = None) -> None:
    """Replace ``module.<name>`` (a parameter) by FP8 ``codes`` and ``scale`` buffers, read back as a
    property in ``dtype``. The old parameter is dropped (freed if nothing else holds it)."""
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    specs = module.__dict__.setdefault("_quantkit_fp8", {})
    specs[name] = QuantizedTensor(granularity, dtype)
    if log is not None:
        module.__dict__["_quantkit_log"] = log
    module.register_buffer(name + CODES, codes)
    module.register_buffer(name + SCALE, scale)
    base = type(module).__bases__[0] if type(module) in _CLASSES.values() else type(module)
    module.__class__ = _fp8_class(base, frozenset(specs))


def quantized_names(module: torch.nn.Module) -> tuple[str, ...]:
    """The tensors of ``module`` held as FP8 codes (empty for any other module)."""
    return tuple(module.__dict__.get("_quantkit_fp8", ()))
