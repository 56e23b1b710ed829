"""Sensitivity: which layers cost the most output fidelity when quantized, and what to keep.

Every layer the plan would quantize is quantized alone (FP8 as ``convert`` writes it: the same
scales, W = q * scale) in the source model, the model runs on the same seeded inputs as
``validate --model-output``, and its output is compared with the unquantized model's. Layers are
ranked by that output SQNR, worst first. With a target, the file as convert writes it is measured
(the plan's FP8 layers quantized, every other float tensor rounded to its keep dtype, as
``validate --model-output`` sees the file) with the first 0, 1, 2 ... ranked layers kept, until the
output reaches the target: the fewest layers of the ranking that reach it (one fewer, in its order,
does not; a shorter list in another order may exist). ``choose_keep`` turns that into convert
options with the reasons (``convert --target-sqnr`` / ``--keep-most-sensitive``).

The model is held whole in float32 (one copy; each layer is restored after its run), so without
``max_memory`` this is for models that fit in memory: a larger one is refused before any work with
how much it needs. With ``max_memory`` the model runs in ``quantkit.runtime``'s budget mode instead
(the blocks that fit stay in memory as stored, the rest are read from the file as they run, computed
in float32) and each quantized layer is made from its weight as its block runs, one at a time
(``_Streamed``): the same values, so the same ranking, within the budget. Its keep proposal for a
target is greedy over the FP8 layers alone (kept tensors are not rounded to the keep dtype there).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from .comfy_names import RenamedView
from .errors import OptionsError, UnsupportedInputError
from .metrics import ErrorStats
from .options import ConvertOptions
from .policy import Action, Rule
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
    if max_memory is not None:
        report = _streamed_sensitivity(src, options, target_sqnr, seed, max_memory, progress)
        progress.close()
        return report
    with _bench(src, options, seed) as bench:
        report = bench.rank(src, target_sqnr, progress)
        if target_sqnr is not None:
            steps = bench.walk(report.layers, lambda sqnr, kept: sqnr >= target_sqnr)
            report.keep = [step.name for step in steps[1:]]
            report.keep_sqnr = steps[-1].sqnr
            report.target_met = report.keep_sqnr >= target_sqnr
    progress.close()
    return report


@dataclass
class KeptLayer:
    """One layer a target keeps: its place in the ranking and what keeping it bought."""

    name: str
    kind: str
    rank: int                 # 1: the most sensitive
    alone_sqnr: float         # output SQNR with it alone in FP8 (the ranking's figure)
    gain: float               # output SQNR gained by keeping it, the layers ranked above it kept already (dB)
    sqnr: float               # output SQNR of the whole file once it is kept (dB)


@dataclass
class KeepChoice:
    """The layers kept for a size-for-quality target (``choose_keep``), and why.

    ``sqnr`` is the output SQNR of the file as it will be written (FP8 layers quantized as convert
    does, every other float tensor rounded to the keep dtype) on ``validate --model-output``'s seeded
    inputs; ``quantized_sqnr`` the same with nothing kept; ``options``: the convert options with one
    ``--keep`` rule per kept layer."""

    target_sqnr: float | None
    most_sensitive: int | None
    inputs: str
    ranked: int                       # layers ranked
    quantized_sqnr: float             # the whole plan, nothing kept
    sqnr: float                       # with the kept layers
    kept: list[KeptLayer] = field(default_factory=list)
    options: ConvertOptions | None = None

    @property
    def reason(self) -> str:
        if self.target_sqnr is not None:
            return f"the {len(self.kept)} most sensitive of {self.ranked} layers: the fewest that reach " \
                   f"{self.target_sqnr:g} dB ({self.quantized_sqnr:.2f} -> {self.sqnr:.2f} dB)"
        return f"--keep-most-sensitive {self.most_sensitive}: the {len(self.kept)} most sensitive of {self.ranked} " \
               f"layers ({self.quantized_sqnr:.2f} -> {self.sqnr:.2f} dB)"

    def to_dict(self) -> dict:
        """The record a manifest and ``--json`` keep: the target, the measured figures, each kept layer."""
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {"target_sqnr": self.target_sqnr, "keep_most_sensitive": self.most_sensitive,
                "measured_on": self.inputs, "ranked_layers": self.ranked,
                "quantized_sqnr": clean(self.quantized_sqnr), "sqnr": clean(self.sqnr), "reason": self.reason,
                "kept": [{k: clean(v) for k, v in asdict(layer).items()} for layer in self.kept]}


def choose_keep(src: str, options: ConvertOptions = ConvertOptions(), *, target_sqnr: float | None = None,
                most_sensitive: int | None = None, seed: int = 0, progress: Progress = NULL) -> KeepChoice:
    """The fewest most-sensitive layers to keep for the file ``options`` would write from ``src`` to
    reach ``target_sqnr`` dB of output SQNR (or exactly the ``most_sensitive`` top-ranked ones), with
    convert options that keep them.

    The layers are ranked as ``sensitivity`` ranks them; then the file as convert will write it is
    measured with the first 0, 1, 2 ... of them kept, and the first count that reaches the target is
    the answer: one layer fewer (in the ranking's order) does not reach it. Raises ``OptionsError``
    when even every ranked layer kept stays below the target (naming the best figure), and
    ``UnsupportedInputError`` where the model cannot be built or loaded (no config.json, weights that
    do not fit it, an FP8 source).

    >>> choice = choose_keep("all-MiniLM-L6-v2", target_sqnr=30)                   # doctest: +SKIP
    >>> convert("all-MiniLM-L6-v2", "out.safetensors", choice.options, keep_choice=choice.to_dict())  # doctest: +SKIP
    """
    if (target_sqnr is None) == (most_sensitive is None):
        raise OptionsError("give a target SQNR or a number of layers to keep, not both",
                           hint="--target-sqnr DB or --keep-most-sensitive N")
    if most_sensitive is not None and most_sensitive < 0:
        raise OptionsError(f"--keep-most-sensitive {most_sensitive}: a count of layers", hint="give N >= 0")
    with _bench(src, options, seed) as bench:
        report = bench.rank(src, target_sqnr, progress)
        if most_sensitive is not None and most_sensitive > len(report.layers):
            raise OptionsError(f"--keep-most-sensitive {most_sensitive}: the plan quantizes only "
                               f"{len(report.layers)} layers", path=bench.path,
                               hint=f"give N <= {len(report.layers)}")
        done = (lambda sqnr, kept: sqnr >= target_sqnr) if target_sqnr is not None else \
            (lambda sqnr, kept: kept >= most_sensitive)
        steps = bench.walk(report.layers, done)
    progress.close()
    if target_sqnr is not None and not steps[-1].sqnr >= target_sqnr:
        raise OptionsError(f"--target-sqnr {target_sqnr:g} dB is out of reach: with all {len(report.layers)} "
                           f"ranked layers kept in {options.keep_dtype.value} the output measures "
                           f"{steps[-1].sqnr:.2f} dB (nothing kept: {steps[0].sqnr:.2f} dB)", path=src,
                           hint=f"ask for {math.floor(steps[-1].sqnr * 100) / 100:.2f} dB or less, or keep "
                                f"tensors in fp32 (--keep-dtype fp32)")
    costs = {c.name: c for c in report.layers}
    kept = [KeptLayer(step.name, costs[step.name].kind, i, costs[step.name].sqnr, step.sqnr - before.sqnr, step.sqnr)
            for i, (before, step) in enumerate(zip(steps, steps[1:]), 1)]
    choice = KeepChoice(target_sqnr, most_sensitive, report.inputs, len(report.layers), steps[0].sqnr,
                        steps[-1].sqnr, kept)
    choice.options = with_kept(options, choice)
    return choice


def with_kept(options: ConvertOptions, choice: KeepChoice) -> ConvertOptions:
    """``options`` with one keep rule per kept layer, after the user's (it wins), each labelled
    with why it is kept (the plan's reason for that tensor)."""
    what = f"--target-sqnr {choice.target_sqnr:g} dB" if choice.target_sqnr is not None \
        else f"--keep-most-sensitive {choice.most_sensitive}"
    rules = tuple(Rule(Action.KEEP, _exact(k.name), f"{what}: #{k.rank} most sensitive (alone {k.alone_sqnr:.2f} dB), "
                                                     f"keeping it {k.gain:+.2f} dB")
                  for k in choice.kept)
    policy = dataclasses.replace(options.policy, rules=options.policy.rules + rules)
    return dataclasses.replace(options, policy=policy)


def _exact(name: str) -> str:
    """A pattern that matches the tensor ``name`` and nothing else (a glob when it has no glob characters)."""
    return name if not set(name) & set("*?[]") else "re:" + re.escape(name)


@dataclass
class _Step:
    name: str | None          # the layer kept at this step (None: nothing kept yet)
    sqnr: float               # the whole file's output SQNR with it and those before it kept


class _Bench:
    """The source model in float32 with what it takes to measure any keep list: every candidate's
    FP8 version, every other float tensor rounded to the dtype convert writes it in, the reference output."""

    def __init__(self, source, options: ConvertOptions, seed: int):
        import torch

        from .models import build_model
        from .plan import make_plan
        checkpoint = source.original if isinstance(source, RenamedView) else source
        _check_memory(checkpoint)
        self.path, self.options = source.path, options
        self.plan = plan = make_plan(source, options)
        self.candidates = _candidates(plan, source)
        self.model = build_model(checkpoint, seed)
        self.module = _loaded(self.model, checkpoint)
        params = self.params = dict(self.module.named_parameters(remove_duplicate=False))
        rows = {t.name: _rows_of(source, t) for t in plan.tensors}
        _check_parameters(self.candidates, rows, params, self.model, source)
        self.reference = _output(self.module, self.model)
        self.fake = {t.name: _fake_quantized_parts(params, rows[t.name], options) for t in self.candidates}
        # As written: a kept float tensor is stored in its keep dtype (BF16 by default), which the
        # output measured by validate --model-output sees too; a kept candidate likewise.
        keep_dtype = {name: options.keep_dtype.resolve(t.info.dtype).torch for t in self.candidates
                      for name, _, _ in rows[t.name]}
        keep_dtype.update({name: t.out_dtype.torch for t in plan.tensors
                           if t.action is Action.KEEP and t.out_dtype.torch.is_floating_point
                           for name, _, _ in rows[t.name] if name in params})
        self.written = {name: params[name].data.to(dtype).float() for name, dtype in keep_dtype.items()
                        if dtype != torch.float32}
        self.kept_as = {t.name: {name: self.written.get(name, params[name].data) for name, _, _ in rows[t.name]}
                        for t in self.candidates}

    def sqnr(self, values: dict) -> float:
        with _swapped(self.params, values):
            return ErrorStats().update(self.reference, _output(self.module, self.model)).sqnr

    def rank(self, src: str, target_sqnr: float | None, progress: Progress) -> SensitivityReport:
        """Each candidate alone in FP8 (the rest as in the source), worst first; and all of them."""
        report = SensitivityReport(os.path.basename(os.path.normpath(src)), self.model.architecture,
                                   self.model.words, self.options.recipe.value, target_sqnr=target_sqnr)
        progress.stage("sensitivity", len(self.candidates))
        for t in self.candidates:
            stats = ErrorStats()
            with _swapped(self.params, self.fake[t.name]):
                stats.update(self.reference, _output(self.module, self.model))
            report.layers.append(LayerCost(t.name, t.decision.kind.value, stats.sqnr, stats.cosine))
            progress.advance(1)
        report.layers.sort(key=lambda c: c.sqnr)
        report.all_sqnr = self.sqnr(_merged(self.fake))
        return report

    def walk(self, ranking: list[LayerCost], done) -> list["_Step"]:
        """The whole file as written with the first 0, 1, 2 ... ranked layers kept, until
        ``done(sqnr, kept)`` or every layer is kept: a step per count measured."""
        kept: list[str] = []
        steps = [_Step(None, self.sqnr(self._as_written(kept)))]
        for layer in ranking:
            if done(steps[-1].sqnr, len(kept)):
                break
            kept.append(layer.name)
            steps.append(_Step(layer.name, self.sqnr(self._as_written(kept))))
        return steps

    def _as_written(self, kept: list[str]) -> dict:
        """Parameter values of the file convert writes with ``kept`` candidates kept."""
        values = dict(self.written)
        for name in self.fake:
            values.update(self.kept_as[name] if name in kept else self.fake[name])
        return values


@contextmanager
def _bench(src: str, options: ConvertOptions, seed: int):
    import torch

    from .formats import get_format
    from .sources import open_source
    # Planned as convert plans it, under the names the format writes (a diffusers FLUX / SD3 / UNet
    # under ComfyUI's for the comfy formats, q/k/v joined under one scale); run under the model's own.
    names = get_format(options.format).source_names
    with open_source(src, component=options.component, ema=options.ema, names=names) as source, torch.no_grad():
        yield _Bench(source, options, seed)


def _candidates(plan, source) -> list:
    """The tensors the plan quantizes that are not FP8 already; a source of FP8 codes is refused."""
    if plan.source_format is not None:      # its weights are FP8 codes already: nothing to rank
        raise UnsupportedInputError(f"already quantized ({plan.source_format})", path=source.path,
                                    hint="rank the layers of the BF16/FP16/FP32 checkpoint it was made from")
    return [t for t in plan.quantized() if t.prequantized is None]


def _check_parameters(candidates, rows: dict, names, model, source) -> None:
    """Refuse a plan whose weights the model built from config.json does not have (``names``)."""
    missing = [name for t in candidates for name, _, _ in rows[t.name] if name not in names]
    if missing:
        raise UnsupportedInputError(f"{len(missing)} planned weights are not parameters of "
                                    f"{model.architecture} ({', '.join(missing[:3])})", path=source.path,
                                    hint="the config.json beside the weights must describe this model")


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
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:         # shapes the config does not give its parameters
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise UnsupportedInputError(f"the weights do not fit the config's architecture ({first})", path=source.path,
                                    hint="the config.json beside the weights must describe this model") from None
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


def _streamed_sensitivity(src: str, options: ConvertOptions, target_sqnr: float | None, seed: int,
                          max_memory: int, progress: Progress) -> SensitivityReport:
    """``sensitivity`` with the model in the runtime's budget mode (``_Streamed``)."""
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
        candidates = _candidates(make_plan(source, options), source)
        model = build_model(checkpoint, seed)
        rows = {t.name: _rows_of(source, t) for t in candidates}
        with _Streamed(model, checkpoint, max_memory, rows, options) as runner:
            _check_parameters(candidates, rows, runner.names, model, source)
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
    return report


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
