"""Sensitivity: which layers cost the most output fidelity when quantized, and what to keep.

Every layer the plan would quantize is quantized alone (FP8 as ``convert`` writes it: the same
scales, W = q * scale) in the source model, the model runs on the same seeded inputs as
``validate --model-output``, and its output is compared with the unquantized model's. Layers are
ranked by that output SQNR, worst first. With a target, the plan is quantized whole and the worst
layers are kept one by one, re-measured each time, until the output reaches the target: a short
``--keep`` list that meets it (greedy, so short, not proven shortest).

The model is held whole in float32 (one copy; each layer is restored after its run), so without
``max_memory`` this is for models that fit in memory: a larger one is refused before any work with
how much it needs. With ``max_memory`` the model runs in ``quantkit.runtime``'s budget mode instead
(the blocks that fit stay in memory as stored, the rest are read from the file as they run, computed
in float32) and each quantized layer is made from its weight as its block runs, one at a time
(``_Streamed``): the same values, so the same ranking, within the budget.
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
                seed: int = 0, max_memory: int | None = None, progress: Progress = NULL) -> SensitivityReport:
    """Rank the layers ``options`` would quantize in ``src`` by the output fidelity each costs alone;
    with ``target_sqnr``, propose the layers to keep so that the whole plan reaches it. ``max_memory``
    (bytes): run the model within it (the runtime's budget mode) rather than whole in float32.

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
        if max_memory is None:
            _check_memory(checkpoint)
        plan = make_plan(source, options)
        if plan.source_format is not None:      # its weights are FP8 codes already: nothing to rank
            raise UnsupportedInputError(f"already quantized ({plan.source_format})", path=source.path,
                                        hint="rank the layers of the BF16/FP16/FP32 checkpoint it was made from")
        candidates = [t for t in plan.quantized() if t.prequantized is None]
        model = build_model(checkpoint, seed)
        rows = {t.name: _rows_of(source, t) for t in candidates}
        with (_Streamed(model, checkpoint, max_memory, rows, options) if max_memory is not None
              else _Resident(model, checkpoint, rows, options)) as runner:
            missing = [name for t in candidates for name, _, _ in rows[t.name] if name not in runner.names]
            if missing:
                raise UnsupportedInputError(f"{len(missing)} planned weights are not parameters of "
                                            f"{model.architecture} ({', '.join(missing[:3])})", path=source.path,
                                            hint="the config.json beside the weights must describe this model")
            report = SensitivityReport(os.path.basename(os.path.normpath(src)), model.architecture, model.words,
                                       options.recipe.value, target_sqnr=target_sqnr)
            reference = runner.output(())
            progress.stage("sensitivity", len(candidates))
            for t in candidates:
                stats = ErrorStats().update(reference, runner.output((t.name,)))
                report.layers.append(LayerCost(t.name, t.decision.kind.value, stats.sqnr, stats.cosine))
                progress.advance(1)
            report.layers.sort(key=lambda c: c.sqnr)
            everything = [t.name for t in candidates]
            report.all_sqnr = ErrorStats().update(reference, runner.output(everything)).sqnr
            if target_sqnr is not None:
                _propose_keep(report, runner, everything, reference, target_sqnr)
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
                                    path=source.path, hint="run it within a memory budget (--max-memory SIZE, "
                                                           "max_memory=: the model streamed block by block)")


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


def _propose_keep(report: SensitivityReport, runner, everything: list[str], reference, target: float) -> None:
    """Keep the worst layers one by one (re-measuring the whole plan each time) until the output
    reaches ``target``."""
    keep: list[str] = []
    sqnr = report.all_sqnr
    for layer in report.layers:
        if sqnr >= target:
            break
        keep.append(layer.name)
        sqnr = ErrorStats().update(reference, runner.output([n for n in everything if n not in keep])).sqnr
    report.keep, report.keep_sqnr, report.target_met = keep, sqnr, sqnr >= target


class _Resident:
    """The model whole in float32, every candidate's quantized values made once; ``output(names)``:
    the model's output with those candidates quantized (swapped in, restored after)."""

    def __init__(self, model, checkpoint, rows: dict, options: ConvertOptions):
        self.model, self.module = model, _loaded(model, checkpoint)
        self.params = dict(self.module.named_parameters(remove_duplicate=False))
        self.names = set(self.params)
        self.rows, self.options, self.fake = rows, options, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.module = self.params = self.fake = None

    def output(self, names):
        import torch
        for name in names:
            if name not in self.fake:
                self.fake[name] = _fake_quantized_parts(self.params, self.rows[name], self.options)
        with torch.no_grad(), _swapped(self.params, _merged({n: self.fake[n] for n in names})):
            return _output(self.module, self.model)


class _Streamed:
    """The model in the runtime's budget mode under ``max_memory`` bytes, computed in float32.
    ``output(names)`` runs it with hooks on each named candidate's module (the one holding all of its
    parts: q/k/v joined under one scale share their attention module): as that module runs, its
    weights (read with its block) are replaced by their quantized values, made then, and restored
    after it, before the block's tensors are dropped. Only one candidate's values exist at a time."""

    def __init__(self, model, checkpoint, max_memory: int, rows: dict, options: ConvertOptions):
        import torch

        from .models import streamed
        self.model, self.rows, self.options = model, rows, options
        self._context = streamed(model, checkpoint, checkpoint.path, torch.float32, max_memory=max_memory)

    def __enter__(self):
        self.module = self._context.__enter__()
        self.names = ({n for n, _ in self.module.named_parameters(remove_duplicate=False)}
                      | set(self.module.quantkit_runtime.stored_names))
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)

    def output(self, names):
        import torch
        handles = []
        try:
            for name in names:
                handles += self._hook(self.rows[name])
            inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                      for k, v in self.model.inputs.items()}
            with torch.no_grad():
                return self.model.output(self.module(**inputs)).detach().float().clone()
        finally:
            for h in handles:
                h.remove()

    def _hook(self, parts: list[tuple[str, int, int]]) -> list:
        owners = [name.rpartition(".")[0] for name, _, _ in parts]
        common = os.path.commonprefix([o + "." for o in owners]).rpartition(".")[0]
        host = self.module.get_submodule(common)
        saved: dict = {}

        def swap(module, args):
            params = {name: _Value(self.module, name) for name, _, _ in parts}
            fake = _fake_quantized_parts({n: v for n, v in params.items()}, parts, self.options)
            for name, value in fake.items():
                saved[name] = params[name].put(value)

        def restore(module, args, output):
            for name, old in saved.items():
                _Value(self.module, name).put(old)
            saved.clear()
        # the runtime's pre-hook (which reads the block) runs before ``swap``; ``restore`` runs before
        # the runtime's post-hook drops the block
        return [host.register_forward_pre_hook(swap), host.register_forward_hook(restore, prepend=True,
                                                                                always_call=True)]


class _Value:
    """A module tensor by name as the runtime holds it: ``.data`` its value in the compute dtype,
    ``put(value)`` replaces what holds it (the stored buffer of a cast weight, else the parameter)
    and returns what was there."""

    def __init__(self, root, name: str):
        from .runtime.weights import held_buffer
        owner, _, self.attr = name.rpartition(".")
        self.module = root.get_submodule(owner)
        self.buffer = held_buffer(self.module, self.attr)

    @property
    def data(self):
        return getattr(self.module, self.attr).data

    def put(self, value):
        import torch
        if self.buffer is not None:
            old, self.module._buffers[self.buffer] = self.module._buffers[self.buffer], value
            return old
        old = self.module._parameters[self.attr]
        self.module._parameters[self.attr] = value if isinstance(value, torch.nn.Parameter) else \
            torch.nn.Parameter(value, requires_grad=False)
        return old
