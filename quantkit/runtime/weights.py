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

Kernel paths (``KERNELS``): on CPU the product is ``quantkit.fp8.dequantize`` itself (a 256-entry
table lookup, the very function ``load_dequantized`` uses, hence bit-identical results); on any
other device ``q.float() * scale`` (the same products, exact in float32). An FP8 matmul path
(torch._scaled_mm / torchao Float8Tensor on CUDA SM >= 8.9) would go in ``dequantized``'s place:
see the package docstring for why it is not there yet.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .. import fp8 as fp8math
from ..fp8 import Granularity

CODES, SCALE = "_fp8", "_scale"      # buffer suffixes: weight -> weight_fp8, weight_scale
STORED = "_stored"                   # a kept weight in its stored dtype: weight -> weight_stored
KERNELS = {
    "cpu": "dequantize per call (quantkit.fp8.dequantize, table lookup) + the layer's own op",
    "device": "dequantize per call (q.float() * scale on the codes' device) + the layer's own op",
}


@dataclass(frozen=True)
class Held:
    """How a module makes one tensor it holds as stored: dequantized (``granularity`` set) or cast,
    into ``dtype``."""

    dtype: torch.dtype
    granularity: Granularity | None = None


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


_CLASSES: dict[tuple[type, frozenset, bool], type] = {}


def _held_class(cls: type, names: frozenset, fp8: bool) -> type:
    """``cls`` with each of ``names`` a property made from what is held (one class per key)."""
    key = (cls, names, fp8)
    if key not in _CLASSES:
        props = {name: property(_getter(name), doc=f"{name}, made on each read from what the module holds")
                 for name in names}
        prefix = "FP8" if fp8 else "Cast"
        _CLASSES[key] = type(prefix + cls.__name__, (cls,), {
            **props, "__module__": __name__,
            "__doc__": f"{cls.__name__} holding {', '.join(sorted(names))} as stored, made on each read"})
    return _CLASSES[key]


def _getter(name: str):
    def get(self):
        held = self.__dict__["_quantkit_held"][name]
        if held.granularity is None:
            return self._buffers[name + STORED].to(held.dtype)
        return dequantized(self._buffers[name + CODES], self._buffers[name + SCALE], held.granularity, held.dtype,
                           self.__dict__.get("_quantkit_log"))
    return get


def make_quantized(module: torch.nn.Module, name: str, codes: torch.Tensor, scale: torch.Tensor,
                   granularity: Granularity, dtype: torch.dtype, log: KernelLog | None = None) -> None:
    """Replace ``module.<name>`` (a parameter) by FP8 ``codes`` and ``scale`` buffers, read back as a
    property in ``dtype``. The old parameter is dropped (freed if nothing else holds it)."""
    if log is not None:
        module.__dict__["_quantkit_log"] = log
    _hold(module, name, Held(dtype, granularity), {CODES: codes, SCALE: scale})


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
    module.__class__ = _held_class(base, frozenset(specs), fp8)


def held_buffer(module: torch.nn.Module, name: str) -> str | None:
    """The buffer holding the stored data of ``module.<name>`` (codes or stored weight), or None."""
    held = module.__dict__.get("_quantkit_held", {}).get(name)
    if held is None:
        return None
    return name + (STORED if held.granularity is None else CODES)
