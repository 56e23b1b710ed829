"""Sensitivity: which layers cost the most output fidelity when quantized, and what to keep.

Every layer the plan would quantize is quantized alone (FP8 as ``convert`` writes it: the same
scales, W = q * scale) in the source model, the model runs on the same seeded inputs as
``validate --model-output``, and its output is compared with the unquantized model's. Layers are
ranked by that output SQNR, worst first. With a target, the plan is quantized whole and the worst
layers are kept one by one, re-measured each time, until the output reaches the target: a short
``--keep`` list that meets it (greedy, so short, not proven shortest).

The model is held whole in float32 (one copy; each layer is restored after its run), so this is
for models that fit in memory: a larger one is refused before any work with how much it needs.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from .comfy_names import RenamedView
from .errors import UnsupportedInputError
from .metrics import ErrorStats
from .options import ConvertOptions
from .progress import NULL, Progress

# Room left for the interpreter, torch and activations beside the float32 model.
MEMORY_FRACTION = 0.6


@dataclass
class LayerCost:
    name: str                 # the weight's key
    kind: str                 # the policy's class (linear, attention projection ...)
    sqnr: float               # output SQNR with this layer alone quantized (dB; inf: no change)
    cosine: float


@dataclass
class SensitivityReport:
    source: str
    architecture: str
    inputs: str
    recipe: str
    layers: list[LayerCost] = field(default_factory=list)      # worst first
    all_sqnr: float = math.inf                                 # every candidate quantized
    target_sqnr: float | None = None
    keep: list[str] | None = None                              # the keep list proposed for the target
    keep_sqnr: float | None = None                             # output SQNR with it
    target_met: bool | None = None

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        d = asdict(self)
        d["layers"] = [{k: clean(v) for k, v in layer.items()} for layer in d["layers"]]
        return {k: clean(v) for k, v in d.items()}


def sensitivity(src: str, options: ConvertOptions = ConvertOptions(), *, target_sqnr: float | None = None,
                seed: int = 0, progress: Progress = NULL) -> SensitivityReport:
    """Rank the layers ``options`` would quantize in ``src`` by the output fidelity each costs alone;
    with ``target_sqnr``, propose the layers to keep so that the whole plan reaches it.

    >>> report = sensitivity("all-MiniLM-L6-v2", target_sqnr=30)     # doctest: +SKIP
    >>> report.layers[0].name, report.keep                            # doctest: +SKIP
    """
    import torch

    from .formats import get_format
    from .models import build_model
    from .plan import make_plan
    from .sources import open_source
    # Planned as convert plans it, under the names the format writes (a diffusers FLUX / SD3 / UNet
    # under ComfyUI's for the comfy formats, q/k/v joined under one scale); run under the model's own.
    names = get_format(options.format).source_names
    with open_source(src, component=options.component, ema=options.ema, names=names) as source, torch.no_grad():
        checkpoint = source.original if isinstance(source, RenamedView) else source
        _check_memory(checkpoint)
        plan = make_plan(source, options)
        if plan.source_format is not None:      # its weights are FP8 codes already: nothing to rank
            raise UnsupportedInputError(f"already quantized ({plan.source_format})", path=source.path,
                                        hint="rank the layers of the BF16/FP16/FP32 checkpoint it was made from")
        candidates = [t for t in plan.quantized() if t.prequantized is None]
        model = build_model(checkpoint, seed)
        module = _loaded(model, checkpoint)
        params = dict(module.named_parameters(remove_duplicate=False))
        rows = {t.name: _rows_of(source, t) for t in candidates}
        missing = [name for t in candidates for name, _, _ in rows[t.name] if name not in params]
        if missing:
            raise UnsupportedInputError(f"{len(missing)} planned weights are not parameters of {model.architecture} "
                                        f"({', '.join(missing[:3])})", path=source.path,
                                        hint="the config.json beside the weights must describe this model")
        report = SensitivityReport(os.path.basename(os.path.normpath(src)), model.architecture, model.words,
                                   options.recipe.value, target_sqnr=target_sqnr)
        reference = _output(module, model)
        fake = {t.name: _fake_quantized_parts(params, rows[t.name], options) for t in candidates}
        progress.stage("sensitivity", len(candidates))
        for t in candidates:
            with _swapped(params, fake[t.name]):
                stats = ErrorStats().update(reference, _output(module, model))
            report.layers.append(LayerCost(t.name, t.decision.kind.value, stats.sqnr, stats.cosine))
            progress.advance(1)
        report.layers.sort(key=lambda c: c.sqnr)
        with _swapped(params, _merged(fake)):
            report.all_sqnr = ErrorStats().update(reference, _output(module, model)).sqnr
        if target_sqnr is not None:
            _propose_keep(report, module, model, params, fake, reference, target_sqnr)
    progress.close()
    return report


def _rows_of(source, t) -> list[tuple[str, int, int]]:
    """The model parameters' rows that the planned tensor ``t`` is made of: ``(name, first row, end
    row)`` parts in a renamed view (joined q/k/v, swapped halves), else the whole tensor itself."""
    parts = source.parts.get(t.name) if isinstance(source, RenamedView) else None
    return list(parts) if parts else [(t.name, 0, t.info.shape[0] if t.info.shape else 1)]


def _fake_quantized_parts(params: dict, parts: list[tuple[str, int, int]], options: ConvertOptions) -> dict:
    """Parameter name -> its value with the tensor made of ``parts`` quantized as convert writes it
    (one tensor: joined rows share its scale), read back and split into its parameters' rows."""
    import torch
    whole = torch.cat([params[name].data[r0:r1] for name, r0, r1 in parts]) if len(parts) > 1 \
        else params[parts[0][0]].data
    fake = _fake_quantized(whole, options)
    if len(parts) == 1:
        return {parts[0][0]: fake}
    out, row = {}, 0
    for name, r0, r1 in parts:
        out.setdefault(name, params[name].data.clone())[r0:r1] = fake[row:row + r1 - r0]
        row += r1 - r0
    return out


def _merged(fake: dict, skip=()) -> dict:
    """Every candidate's fake-quantized parameters but those of ``skip``, in one mapping."""
    return {k: v for name, values in fake.items() if name not in skip for k, v in values.items()}


def _check_memory(source) -> None:
    """Refuse, before any work, a model whose float32 copy does not fit beside everything else."""
    need = sum(i.numel for i in source.tensors.values()) * 4
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > MEMORY_FRACTION * have:
        raise UnsupportedInputError(f"sensitivity holds the model in float32: about {need / 1e9:.1f} GB, "
                                    f"more than {MEMORY_FRACTION:.0%} of this machine's {have / 1e9:.1f} GB",
                                    path=source.path, hint="run it on a machine with more memory, or measure "
                                                           "the whole plan with validate --model-output (streamed)")


def _loaded(model, source):
    """A fresh module with the source's weights, float32, assigned in place of its empty parameters."""
    module = model.make()
    state = {name: source.read_tensor(info).float() if info.dtype.torch.is_floating_point else
             source.read_tensor(info).clone() for name, info in source.tensors.items()}
    result = module.load_state_dict(state, strict=False, assign=True)
    buffers = {name for name, _ in module.named_buffers()}
    unexpected = [k for k in result.unexpected_keys if k not in buffers]
    if unexpected:
        raise UnsupportedInputError(f"the weights do not fit the config's architecture ({', '.join(unexpected[:3])})",
                                    path=source.path, hint="the config.json beside the weights must describe "
                                                           "this model")
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    still_empty = [n for n, p in module.named_parameters() if p.is_meta]
    if still_empty:
        raise UnsupportedInputError(f"the checkpoint lacks {', '.join(still_empty[:3])}", path=source.path,
                                    hint="the config.json beside the weights must describe this model")
    return module.float().eval()


def _output(module, model):
    return model.output(module(**model.inputs)).detach().float().clone()


def _fake_quantized(w, options: ConvertOptions):
    """``w`` as convert would write it, read back: W = q * scale with convert's scales."""
    from . import fp8
    g, fmt = options.granularity, options.fp8
    scale = fp8.scale_from_absmax(fp8.absmax(w, g), fmt)
    return fp8.dequantize(fp8.quantize(w, scale, g, fmt), scale, g).reshape(w.shape)


class _swapped:
    """Parameters' values replaced for the duration of a ``with`` block, then restored."""

    def __init__(self, params: dict, values: dict):
        self.params, self.values, self.saved = params, values, {}

    def __enter__(self):
        for name, value in self.values.items():
            self.saved[name] = self.params[name].data
            self.params[name].data = value
        return self

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            self.params[name].data = value


def _propose_keep(report: SensitivityReport, module, model, params: dict, fake: dict, reference,
                  target: float) -> None:
    """Keep the worst layers one by one (re-measuring the whole plan each time) until the output
    reaches ``target``."""
    keep: list[str] = []
    sqnr = report.all_sqnr
    for layer in report.layers:
        if sqnr >= target:
            break
        keep.append(layer.name)
        with _swapped(params, _merged(fake, keep)):
            sqnr = ErrorStats().update(reference, _output(module, model)).sqnr
    report.keep, report.keep_sqnr, report.target_met = keep, sqnr, sqnr >= target
