"""Activation statistics: the input of every quantized layer, observed while the source model runs.

The model is built from the ``config.json`` beside the weights without memory
(``quantkit.models.build_model``) and loaded by ``quantkit.runtime`` in streamed mode (one
block's weights in memory at a time, read from disk when it runs), so a model larger than the
machine's memory calibrates too. A forward pre-hook on each module whose weight the plan quantizes
feeds that module's input to an observer (per tensor, static: ``AbsMax`` running max,
``MovingAverage``, ``Percentile``) and sums its squares and count for the RMS. Modules are named
back to the checkpoint's own tensor names through the runtime's placements
(``RuntimeInfo.stored_names``). A layer whose input is 2-D ([batch, features]: one vector per
sample, as AdaLN modulation and time/guidance/pooled-text embedders take) is marked ``per_sample``:
calibration gives it no static range (see ``collect``).

    >>> from quantkit.calibration.observers import AbsMax
    >>> layer = torch.nn.Linear(2, 1)
    >>> rec = InputRecorder(torch.nn.Sequential(layer), {"0": "fc.weight"}, AbsMax)
    >>> _ = layer(torch.tensor([[1.0, -5.0]])); rec.close()
    >>> float(rec.inputs["fc.weight"].observer.statistic()), rec.inputs["fc.weight"].values
    (5.0, 2)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from quantkit import fp8
from quantkit.calibration.observers import Observer
from quantkit.fp8 import Granularity
from quantkit.errors import UnsupportedInputError
from quantkit.progress import NULL, Progress


SQUARES_CHUNK = 1 << 20


@dataclass
class LayerInput:
    """What one layer's input looked like over the passes."""

    observer: Observer
    absmax: float = 0.0
    sum_squares: float = 0.0          # float64 sum: the RMS of billions of values stays exact enough
    values: int = 0
    per_sample: bool = False          # a 2-D [batch, features] input: one vector per sample, no tokens

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.observer.update(x)
        if x.numel():
            self.absmax = max(self.absmax, float(fp8.absmax(x, Granularity.TENSOR)))   # aminmax: no |x| copy
        flat = x.reshape(-1)
        for i in range(0, flat.numel(), SQUARES_CHUNK):
            # float64 a chunk at a time: exact enough over billions of values, without a float64 copy of x
            self.sum_squares += float(flat[i:i + SQUARES_CHUNK].double().square().sum())
        self.values += x.numel()

    @property
    def rms(self) -> float:
        return math.sqrt(self.sum_squares / self.values) if self.values else 0.0


class InputRecorder:
    """Forward pre-hooks on ``module``'s submodules ``layers`` (dotted module name -> the tensor name
    its statistics go under), each feeding its first input to a fresh ``make_observer()``."""

    def __init__(self, module: torch.nn.Module, layers: dict[str, str], make_observer: Callable[[], Observer]):
        self.inputs: dict[str, LayerInput] = {}
        self.mask: torch.Tensor | None = None     # [batch, tokens] of the pass running: real tokens only
        self.handles = []
        for name, tensor in layers.items():
            self.handles.append(module.get_submodule(name).register_forward_pre_hook(
                self._hook(tensor, make_observer), with_kwargs=True))

    def _hook(self, tensor: str, make_observer):
        def hook(module, args, kwargs):
            x = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
            if x is None or not x.is_floating_point():
                return
            per_sample = x.dim() == 2
            if self.mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask]                  # [real tokens, features]: padding left out
            if tensor not in self.inputs:
                self.inputs[tensor] = LayerInput(make_observer())
            self.inputs[tensor].per_sample |= per_sample
            self.inputs[tensor].update(x)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass
class ActivationStats:
    """Inputs observed per quantized tensor, and what running the model took."""

    inputs: dict[str, LayerInput]
    samples: int
    architecture: str
    peak_bytes: int                   # the runtime's peak of weights held (streamed: about a block)
    model_bytes: int                  # the checkpoint's size on disk
    unobserved: list[str] = field(default_factory=list)   # quantized tensors whose layer never ran / has no module


class HessianRecorder:
    """GPTQ's statistic of each hooked layer's input: ``H = sum x x^T`` over its tokens (float32), for
    ``layers`` (dotted module name -> tensor name). Layers that take the very same input tensor as
    the layer hooked just before them (q, k, v of one attention) share that layer's Hessian
    (``shared``: tensor -> the key it is stored under, learnt on the first pass and kept). On the
    group's last pass (``final``), a Hessian is complete once its layer has run: it goes to ``sink``
    (``add(key, H, tokens)``) and is dropped then, so only the layers running hold one.
    A 2-D input (one vector per sample: modulation, embedders) gets none (``per_sample``)."""

    def __init__(self, module: torch.nn.Module, layers: dict[str, str], sink, shared: dict[str, str]):
        self.sink, self.shared = sink, shared
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.done: set[str] = set()
        self.per_sample: set[str] = set()
        self.mask: torch.Tensor | None = None
        self.final = False
        self._last = None                         # (input, its version, key) of the layer hooked last
        self.handles = []
        for name, tensor in layers.items():
            sub = module.get_submodule(name)
            self.handles.append(sub.register_forward_pre_hook(self._pre(tensor, sub), with_kwargs=True))
            self.handles.append(sub.register_forward_hook(self._post(tensor)))

    def _pre(self, tensor: str, sub):
        from quantkit.gptq import hessian_update

        def hook(module, args, kwargs):
            x = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
            weight = getattr(sub, "weight", None)
            if x is None or not x.is_floating_point() or weight is None or weight.dim() != 2 \
                    or x.shape[-1] != weight.shape[1]:
                return
            if x.dim() == 2:
                self.per_sample.add(tensor)
                return
            last = self._last
            same = last is not None and last[0] is x and last[1] == x._version
            key = self.shared.setdefault(tensor, last[2] if same else tensor)
            self._last = (x, x._version, key)
            if key != tensor or key in self.done:        # a sharer: its leader took this very input
                return
            if self.mask is not None and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask]                          # [real tokens, features]: padding left out
            if key not in self.sums:
                self.sums[key] = torch.zeros(x.shape[-1], x.shape[-1])
                self.tokens[key] = 0
            self.tokens[key] += hessian_update(self.sums[key], x)
        return hook

    def _post(self, tensor: str):
        def hook(module, args, output):
            if self.final and tensor in self.sums:
                self._flush(tensor)
        return hook

    def _flush(self, key: str) -> None:
        self.sink.add(key, self.sums.pop(key), self.tokens.pop(key))
        self.done.add(key)

    def close(self) -> None:
        """Remove the hooks; Hessians still held (a layer whose last pass did not reach it) go to the sink."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self._last = None
        for key in sorted(self.sums):
            self._flush(key)


@dataclass
class HessianPlan:
    """What ``observe`` gathers for GPTQ: ``groups`` of tensors whose Hessians fit in memory together
    (one group: every layer in the same passes as the input ranges; more: the passes repeated per
    group), written to ``sink`` as they complete."""

    sink: object
    groups: list[set[str]]
    shared: dict[str, str] = field(default_factory=dict)
    per_sample: set[str] = field(default_factory=set)


def observe(model, source, batches: list[dict], quantized: set[str], make_observer: Callable[[], Observer], *,
            dtype: torch.dtype = torch.float32, progress: Progress = NULL,
            masks: list[torch.Tensor | None] | None = None, max_memory: int | None = None,
            hessians: HessianPlan | None = None) -> ActivationStats:
    """Run ``model`` (``models.build_model``'s ``Model``) loaded streamed from ``source`` (an opened
    checkpoint under its own names) on ``batches``, observing the input of every layer whose weight is
    in ``quantized`` (of a [batch, tokens, ...] input, only the tokens ``masks[i]`` marks); then drop it.
    ``max_memory`` (bytes): loaded in the runtime's budget mode instead of streamed. ``hessians``:
    also gather GPTQ's input Hessians (``HessianRecorder``), a group of layers at a time."""
    from quantkit.models import streamed
    with streamed(model, source, source.path, dtype, max_memory=max_memory) as module:
        info = module.quantkit_runtime
        layers = {target.rpartition(".")[0]: key for target, key in info.stored_names.items()
                  if key in quantized and target.rpartition(".")[2] == "weight"}
        recorder = InputRecorder(module, layers, make_observer)
        groups = [None] if hessians is None else hessians.groups
        # Each pass streams the whole checkpoint from disk: progress in bytes read.
        per_pass = getattr(source, "file_size", 0)
        progress.stage("activate", per_pass * len(batches) * len(groups))
        with torch.no_grad():
            for g, group in enumerate(groups):
                gather = None if group is None else HessianRecorder(
                    module, {m: t for m, t in layers.items() if t in group}, hessians.sink, hessians.shared)
                for i, batch in enumerate(batches):
                    if recorder is not None:
                        recorder.mask = masks[i] if masks else None
                    if gather is not None:
                        gather.mask, gather.final = (masks[i] if masks else None), i == len(batches) - 1
                    _forward(module, _cast(batch, dtype), model.architecture, source.path, i)
                    progress.advance(per_pass)
                if gather is not None:
                    gather.close()
                    hessians.per_sample |= gather.per_sample
                if g == 0:                    # input ranges come from the first group's passes
                    recorder.close()
                    inputs, recorder = recorder.inputs, None
        unobserved = sorted(quantized - set(inputs))
        return ActivationStats(inputs=inputs, samples=len(batches), architecture=model.architecture,
                               peak_bytes=info.peak_bytes, model_bytes=getattr(source, "file_size", 0),
                               unobserved=unobserved)


def _forward(module, batch: dict, architecture: str, path: str, i: int) -> None:
    try:
        module(**batch)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise UnsupportedInputError(f"{architecture} does not run on calibration input {i} "
                                    f"({type(exc).__name__}: {str(exc).strip()[:200]})", path=path,
                                    hint="give inputs the model's forward takes (--inputs module:function), or "
                                         "calibrate the weights only (--weights-only)") from None


def _cast(value, dtype: torch.dtype):
    """Floating tensors (also inside dicts, lists and tuples) in the compute dtype; the rest as it is."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value
