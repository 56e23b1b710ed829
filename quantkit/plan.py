"""Plan stage: decide every tensor's fate and every output tensor's dtype and shape.

A plan is computed from the header alone (no tensor data is read), so ``quantkit plan`` is
instant, and the writer can lay out the output's header before the first byte of data.
"""
from __future__ import annotations

import dataclasses
import os
import re

import torch

from . import dtypes
from .calibration.stats import Stats, check_shapes, fingerprint, mismatch
from .comfy_names import RenamedView
from .dtypes import Granularity, Kind
from .errors import FormatError, PolicyError, UnsupportedInputError
from .fp8 import BLOCK_SIZE, scale_shape
from .hashing import combined_digest, sha256_file
from .options import ConvertOptions, KeepDtype, Recipe, parse_size  # noqa: F401  (re-exported: the plan's inputs)
from .planned import Plan, PlannedTensor, StoredTensor
from .policy import QUANTIZABLE, RECIPE_KEEPS_ATTENTION, Action, Decision, Policy
from .reader import SafetensorsFile, TensorInfo


def plan_tensor(info: TensorInfo, options: ConvertOptions, policy: Policy, path: str) -> PlannedTensor:
    decision = policy.decide(info.name, info.shape, info.dtype)
    if info.dtype.kind is Kind.FP8:
        raise UnsupportedInputError(f"already {info.dtype.code}", path=path, tensor=info.name,
                                    hint="this checkpoint is already quantized; convert its BF16/FP16/FP32 original")
    if decision.action is Action.QUANTIZE:
        return PlannedTensor(info, decision, dtypes.BY_CODE[options.fp8.safetensors_dtype],
                             scale_shape(info.shape, options.granularity))
    if decision.action is Action.KEEP:
        return PlannedTensor(info, decision, options.keep_dtype.resolve(info.dtype))
    return PlannedTensor(info, decision, info.dtype)


def make_plan(source: SafetensorsFile, options: ConvertOptions, stats: Stats | None = None) -> Plan:
    """Plan the conversion of one safetensors file under ``options`` (reads the header only).

    Args:
        source: the opened checkpoint (``open_source``), under the names the format writes.
        options: the conversion's options; the format refuses those it cannot express here.
        stats: weight ranges and activation ranges of the quantized tensors, under the plan's names
            (``apply_stats``), checked with ``check_stats`` and with options from ``options_with_stats``.

    Returns:
        The ``Plan``: every tensor's action (quantize, keep, pass) and reason, and the output's
        tensors in file order as the format lays them out.

    Raises:
        PolicyError: an option or rule the format or the source cannot honour, named.

    >>> with open_source("model.safetensors") as src:             # doctest: +SKIP
    ...     plan = make_plan(src, ConvertOptions())
    """
    from .formats import get_format
    from .presets import resolve
    fmt = get_format(options.format)
    source_format, stored = _already_quantized(source)
    if stored is not None:
        options = _follow_source(options, stored, source.path)
    fmt.check(options)
    fmt.check_source(source)
    preset, why = resolve(options.preset, source.tensors)
    rules = preset.rules(source.tensors)
    if options.preset == "auto":
        # A diffusers-named model: the family its ComfyUI names tell wins where the diffusers names told
        # none or another (a diffusers PixArt's adaln_single.* also reads as LTX-Video's).
        found = _preset_through_comfyui_names(source)
        if found is not None and found[0].name != preset.name:
            preset, why, rules = found
    recipe = dataclasses.replace(options.policy, keep_attention=options.recipe is Recipe.MIXED)
    policy = recipe.with_preset(preset.name, rules)
    plan = Plan(os.path.basename(os.path.normpath(source.path)), options, [],
                notes=[*getattr(source, "notes", []), why], policy=policy, source_format=source_format)
    if stored is not None:
        carried_note = f"source is already quantized ({source_format})"     # completed once laid out
        plan.notes.append(carried_note)
    for info in source.tensors.values():
        s = stored.get(info.name) if stored is not None else None
        if stored is not None and s is None:
            continue                                     # a scale or marker of the source's format
        if s is None or s.scale_key is None:
            plan.tensors.append(plan_tensor(info, options, policy, source.path))
        else:
            plan.tensors.append(_plan_prequantized(info, s, options, policy, source_format))
    kept_attention = sum(t.decision.reason == RECIPE_KEEPS_ATTENTION for t in plan.tensors)
    if kept_attention:
        plan.notes.append(f"recipe mixed: {kept_attention} attention projections the preset quantizes stay in "
                          f"{options.keep_dtype.value} (--recipe compact quantizes them)")
    _keep_unreadable(plan, fmt.unreadable(source, [t for t in plan.quantized() if t.prequantized is None]))
    if stats is not None:
        apply_stats(plan, source, stats)
    fmt.check_plan(plan)
    plan.outputs = fmt.layout(plan)
    if stored is not None:
        plan.notes[plan.notes.index(carried_note)] = _carried_note(source_format, plan, fmt)
    _refuse_clashes(plan)
    for rule in options.policy.rules:
        matched = [t for t in plan.tensors if rule.matches(t.name)]
        if not matched:
            plan.warnings.append(f"rule --{rule.action.value} {rule.typed} matched no tensor")
        elif rule.action is Action.QUANTIZE and not any(t.decision.kind in QUANTIZABLE for t in matched):
            plan.warnings.append(f"rule --quantize {rule.typed} matched only tensors that cannot be quantized"
                                 " (biases, norms, vectors, non-floats); they stay as they are")
    if not plan.quantized():
        plan.warnings.append("no tensor is quantized: the output only changes precision of kept tensors")
    plan.warnings.extend(fmt.warnings(plan))
    return plan


def _carried_note(source_format: str, plan: Plan, fmt) -> str:
    """What of an FP8 source is carried over: its codes and weight scales, and its static input scales
    (those the output format has no place for are named in a warning)."""
    from .formats.base import source_input_scales
    held = source_input_scales(plan)
    dropped = fmt.dropped_input_scales(plan)
    note = f"source is already quantized ({source_format}): FP8 codes and weight scales are carried over"
    if held:
        note += f", with {len(held) - len(dropped)} of its {len(held)} static input scales"
        if dropped:
            note += f" ({len(dropped)} dropped: format {fmt.name} has no place for them)"
    elif plan.stats is None:
        note += " (it holds no static input scales)"
    return note


def _refuse_clashes(plan: Plan) -> None:
    """A source tensor named like what the format writes beside a quantized layer (``<L>.weight_scale``,
    ``<L>.input_scale``...) would be written twice: refused, naming it."""
    seen = set()
    for emit in plan.outputs:
        key = emit.spec.key
        if key in seen:
            raise PolicyError(f"the output would hold {key} twice: the source has a tensor of that name and format "
                              f"{plan.options.format!r} writes one beside a quantized layer", path=plan.source,
                              tensor=key, hint="keep that layer in high precision with --keep, or use another format")
        seen.add(key)


def recipe_sizes(source: SafetensorsFile, options: ConvertOptions) -> dict[str, int | None]:
    """The output's size under each recipe, for the same source and options (plans from the header
    only; None where a recipe cannot be planned)."""
    from .errors import QuantkitError
    sizes: dict[str, int | None] = {}
    for recipe in Recipe:
        try:
            sizes[recipe.value] = make_plan(source, dataclasses.replace(options, recipe=recipe)).bytes_out
        except QuantkitError:
            sizes[recipe.value] = None
    return sizes


def _keep_unreadable(plan: Plan, unreadable: dict[str, str]) -> None:
    """Keep in high precision the tensors the format's clients cannot read as FP8 (written as FP8
    they would load wrong, silently). A user's --quantize rule that asked for nothing but such
    tensors is refused; a broader one (``'*'``) is obeyed elsewhere, with a warning naming it."""
    overruled: dict = {}
    for i, t in enumerate(plan.tensors):
        why = unreadable.get(t.name)
        if why is None:
            continue
        rule = t.decision.rule
        if rule is not None and not rule.origin:
            overruled.setdefault(rule, []).append((t.name, why))
        decision = Decision(Action.KEEP, t.decision.kind, f"{t.decision.kind.value}: kept, {why}", rule)
        plan.tensors[i] = PlannedTensor(t.info, decision, plan.options.keep_dtype.resolve(t.info.dtype))
    for rule, kept in overruled.items():
        name, why = kept[0]
        if not any(t.decision.rule is rule and t.action is Action.QUANTIZE for t in plan.tensors):
            raise PolicyError(f"{rule.label} asks for FP8, but format {plan.options.format!r} cannot hold it: {why}",
                              path=plan.source, tensor=name, hint="drop that rule, or use --format native")
        more = f" and {len(kept) - 1} more" if len(kept) > 1 else ""
        plan.warnings.append(f"{rule.label}: {name}{more} kept in {plan.options.keep_dtype.value}: {why}")


def _plan_prequantized(info: TensorInfo, s: StoredTensor, options: ConvertOptions, policy: Policy,
                       source_format: str) -> PlannedTensor:
    """An FP8 tensor of the source: its codes and scale carried over, or, when the user's own
    --keep rule names it, dequantized (W = q * scale) to the keep dtype (BF16 for ``source``)."""
    decision = policy.decide(info.name, info.shape, dtypes.F32)
    if decision.action is Action.KEEP and decision.rule is not None and not decision.rule.origin:
        kept = Decision(Action.KEEP, decision.kind, f"{decision.kind.value}: {decision.rule.label}: "
                                                    f"dequantized from FP8 ({source_format})", decision.rule)
        return PlannedTensor(info, kept, options.keep_dtype.resolve(dtypes.BF16), None, s)
    carried = Decision(Action.QUANTIZE, decision.kind, f"already FP8 ({source_format}): codes and scale carried over")
    return PlannedTensor(info, carried, info.dtype, scale_shape(info.shape, s.granularity), s)


def _already_quantized(source: SafetensorsFile) -> tuple[str | None, dict[str, StoredTensor] | None]:
    """For a source that is already an FP8 checkpoint of a known convention: its format's name and
    how each tensor is stored; ``(None, None)`` for a source without FP8 tensors."""
    if not any(i.dtype.kind is Kind.FP8 for i in source.tensors.values()):
        return None, None
    from .formats import detect_format
    try:
        fmt = detect_format(source)
    except UnsupportedInputError:
        fmt = None
    if fmt is None:
        first = next(i for i in source.tensors.values() if i.dtype.kind is Kind.FP8)
        raise UnsupportedInputError(f"already {first.dtype.code}, without scales of a convention quantkit knows",
                                    path=source.path, tensor=first.name,
                                    hint="convert its BF16/FP16/FP32 original instead")
    try:
        stored = fmt.stored(source)
    except FormatError as exc:
        raise UnsupportedInputError(f"looks like a {fmt.name} checkpoint but does not follow it: {exc.message}",
                                    path=source.path, tensor=exc.tensor,
                                    hint="convert its BF16/FP16/FP32 original instead") from None
    return fmt.name, stored


def _follow_source(options: ConvertOptions, stored: dict[str, StoredTensor], path: str) -> ConvertOptions:
    """Options for an already-FP8 source, whose codes and scales are carried over (no
    re-quantization): granularity and FP8 dtype are the source's unless the user gave them, and
    a given one must match what it holds."""
    scaled = [s for s in stored.values() if s.scale_key is not None]
    if not scaled:
        return options
    held = {(s.granularity, s.fp8) for s in scaled}
    first = scaled[0]
    if len(held) == 1:
        changes = {k: v for k, v in (("granularity", first.granularity), ("fp8", first.fp8)) if k in options.from_source}
        options = dataclasses.replace(options, **changes)
    for s in scaled:
        if s.granularity is not options.granularity or s.fp8 is not options.fp8:
            raise UnsupportedInputError(
                f"already quantized as {s.fp8.name} with {s.granularity.value} scales; re-quantizing is not supported",
                path=path, tensor=s.source_key,
                hint=f"pass --granularity {s.granularity.value} --fp8-dtype {s.fp8.name} (or neither), "
                     "or convert the original")
    return options


# --- stats (convert --stats): checked against the source, then mapped onto the plan's tensors ---

def own_tensors(source) -> dict[str, TensorInfo]:
    """The source's tensors under its own names (a view under ComfyUI's names: the checkpoint's),
    the names a stats file uses."""
    return source.original.tensors if isinstance(source, RenamedView) else source.tensors


def load_stats(path: str) -> Stats:
    """The stats file at ``path``; a missing, corrupt or foreign file is a one-line error."""
    from .calibration.stats import load
    if not os.path.isfile(path):
        raise UnsupportedInputError("no such stats file", path=path,
                                    hint="give the file quantkit calibrate wrote (-o STATS)")
    return load(path)


def source_sha256(source) -> str:
    """The source's SHA256 as a manifest names it (``combined_digest`` of its files)."""
    return combined_digest({f: sha256_file(f) for f in source.files})


def check_stats(source, stats: Stats, *, force: bool = False, warn=lambda message: None) -> bool:
    """Before any work: whether ``stats`` were calibrated on ``source`` (their header fingerprints
    agree; the SHA256 is checked while converting). On a mismatch the source is hashed and the
    error names both SHA256s; ``force`` turns it into a warning (``warn``) and returns False.
    Matching stats must be shaped like this checkpoint's scales."""
    if fingerprint(own_tensors(source)) != stats.source.get("fingerprint"):
        error = mismatch(stats, source_sha256(source), source.path)
        if not force:
            raise error
        warn(f"--force-stats: {error.message}; the ranges that fit its tensors are used")
        return False
    check_shapes(stats, own_tensors(source))
    return True


def options_with_stats(options: ConvertOptions, stats: Stats) -> ConvertOptions:
    """``options`` with the stats' granularity and FP8 dtype where the user left them unset; a
    given one that differs is refused (the weight ranges are shaped, and were searched, for them)."""
    from .calibration.stats import StatsMismatchError
    changes = {}
    for field, flag, given, calibrated in (("granularity", "--granularity", options.granularity, stats.granularity),
                                           ("fp8", "--fp8-dtype", options.fp8, stats.fp8)):
        if field in options.from_source:
            changes[field] = calibrated
        elif given is not calibrated:
            name = getattr(calibrated, "value", None) or calibrated.name
            asked = getattr(given, "value", None) or given.name
            raise StatsMismatchError(f"the stats were calibrated for {flag} {name}, but {flag} {asked} was given",
                                     path=stats.path, hint=f"drop {flag} (the stats' {name} is used), or calibrate "
                                                           f"again with {flag} {asked}")
    return dataclasses.replace(options, **changes, from_source=options.from_source - set(changes))


def stats_record(stats: Stats, sha256: str | None = None) -> dict:
    """What the stats are, for the header, the manifest and the model card: ``Stats.describe()``
    without the local path, the file's name and SHA256 instead."""
    record = {k: v for k, v in stats.describe().items() if k != "path"}
    return {"file": os.path.basename(stats.path) if stats.path else None, "sha256": sha256, **record}


def apply_stats(plan: Plan, source, stats: Stats) -> None:
    """Fill ``plan.weight_ranges`` and each quantized tensor's ``input_range`` from ``stats``, mapped
    from the source's own names to the plan's (a tensor ComfyUI's naming joins from parts: per
    tensor the max of the parts' ranges, per channel their rows, per block their tile rows when
    the parts start on 128-row tiles). Tensors without a usable statistic keep absmax scales (one
    warning counts them); statistics of another checkpoint that do not fit are not usable."""
    own = own_tensors(source)
    parts = source.parts if isinstance(source, RenamedView) else {}
    g = plan.options.granularity
    no_weight, no_input = [], []
    for i, t in enumerate(plan.tensors):
        if t.action is not Action.QUANTIZE:
            continue
        pieces = parts.get(t.name) or [(t.name, 0, t.info.shape[0] if t.info.shape else 1)]
        if t.prequantized is None:
            rng = _weight_range(pieces, own, stats, g)
            if rng is None or tuple(rng.shape) != tuple(t.scale_shape):
                no_weight.append(t.name)
            else:
                plan.weight_ranges[t.name] = rng
        inputs = [stats.activations.get(name) for name, _, _ in pieces]
        if all(r is not None for r in inputs) and inputs:
            # A joined layer (q/k/v) takes one input: the widest range of its parts' covers it.
            plan.tensors[i] = dataclasses.replace(t, input_range=max(float(r) for r in inputs))
        else:
            no_input.append(t.name)
    quantized = plan.quantized()
    plan.stats = {**stats_record(stats), "weight_scales": len(plan.weight_ranges),
                  "input_scales": sum(t.input_range is not None for t in quantized)}
    if no_weight:
        plan.warnings.append(f"--stats: {len(no_weight)} quantized tensor(s) without a weight range in the stats "
                             f"({_examples(no_weight)}): their scales come from their absmax")
    if no_input and stats.activations:
        # calibrate records no input range for a per-sample projection (modulation, pooled embedders: one
        # input vector per sample) on purpose: those layers run weight-only. Only the others lack one.
        by_design = [n for n in no_input if _per_sample(stats, parts.get(n) or [(n, 0, 0)])]
        lacking = [n for n in no_input if n not in by_design]
        if by_design:
            plan.notes.append(f"--stats: {len(by_design)} per-sample modulation layer(s) run weight-only by design "
                              f"({_examples(by_design)}): nothing to do")
        if lacking:
            plan.warnings.append(f"--stats: {len(lacking)} quantized layer(s) without an activation range in the "
                                 f"stats ({_examples(lacking)}): no static input scale is written for them (they run "
                                 "weight-only); if they should run W8A8, calibrate with inputs that reach them "
                                 "(quantkit calibrate --inputs) and with the same policy options as this convert")


def _per_sample(stats: Stats, pieces) -> bool:
    """Whether calibrate saw the layer (all of its parts) take one input vector per sample."""
    return all(isinstance(stats.layers.get(name), dict) and stats.layers[name].get("input_per_sample") is True
               for name, _, _ in pieces)


# A stats range that clips its weight this much (the clipped values' error alone leaves an SQNR below
# this; E4M3 rounding leaves ~31 dB) costs the tensor more than FP8 itself: warned. An MSE observer's
# clipping stays far above it (its total error is below round-to-nearest's at absmax).
CLIP_WARN_DB = 25.0
# A range this many times the weight's absmax puts its largest value at or below FP8 max / 64.
WIDE_WARN_RATIO = 64.0


def stats_fit_warnings(fits: dict) -> list[str]:
    """Warnings for stats ranges that do not fit the weights they scaled (``fits``: tensor ->
    ``metrics.ScaleFit`` measured while quantizing): ranges below the weights' absmax that clip
    them hard, and ranges so far above it that the weights lose FP8's precision or round to 0."""
    out = []
    clipped = sorted((n for n, f in fits.items() if f.clip_sqnr < CLIP_WARN_DB), key=lambda n: fits[n].clip_sqnr)
    if clipped:
        worst = fits[clipped[0]]
        out.append(f"--stats: {len(clipped)} tensor(s) clipped by the stats' weight ranges, worst {clipped[0]}: "
                   f"{100 * worst.clipped_fraction:.3g}% of its values at the FP8 maximum, SQNR {worst.clip_sqnr:.1f} "
                   f"dB from the clipping alone ({_examples(clipped)}): the stats do not match these weights "
                   "(calibrated on another checkpoint, edited, or a clipping observer such as a percentile): "
                   "recalibrate this checkpoint (--observer absmax or mse), or convert without --stats")
    wide = sorted((n for n, f in fits.items() if f.fill is not None and f.fill * WIDE_WARN_RATIO <= 1),
                  key=lambda n: fits[n].fill)
    if wide:
        worst = fits[wide[0]]
        top = worst.fmt.max_finite
        what = "every value rounds to 0" if worst.zeroed else \
            f"its largest value maps to {top * worst.fill:.3g} of FP8's {top:g} and small ones lose precision"
        times = 1 / worst.fill if worst.fill else float("inf")
        out.append(f"--stats: {len(wide)} tensor(s) with weight ranges far above their weights, worst {wide[0]}: "
                   f"its range is {times:.3g}x its absmax, {what} ({_examples(wide)}): the stats do not match these "
                   "weights: recalibrate this checkpoint, or convert without --stats")
    return out


def _weight_range(pieces, own: dict, stats: Stats, g: Granularity) -> torch.Tensor | None:
    """The range of a tensor made of ``pieces`` (source name, first row, end row), scale-shaped for
    ``g``; None when a piece has no statistic that fits, or (per block) the pieces do not start on
    128-row tiles."""
    ranges = []
    for k, (name, r0, r1) in enumerate(pieces):
        rng, info = stats.weights.get(name), own.get(name)
        if rng is None or info is None or tuple(rng.shape) != tuple(scale_shape(info.shape, g)):
            return None
        if g is Granularity.TENSOR:
            ranges.append(rng.reshape(()))
        elif g is Granularity.CHANNEL:
            ranges.append(rng[r0:r1])
        else:
            whole_tiles = (r1 - r0) % BLOCK_SIZE == 0 or k == len(pieces) - 1
            if r0 % BLOCK_SIZE or not whole_tiles:
                return None
            ranges.append(rng[r0 // BLOCK_SIZE: -(-r1 // BLOCK_SIZE)])
    if not ranges:
        return None
    return torch.stack(ranges).amax() if g is Granularity.TENSOR else torch.cat(ranges, dim=0).float()


def _examples(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


@dataclasses.dataclass
class SourcePlan:
    """What ``quantkit plan`` shows: the ``plan`` of a source under ``options`` (with the stats'
    granularity and FP8 dtype where they apply), the output's size under each recipe (``sizes``,
    None where one cannot be planned), the source rows each joined tensor is made of (``joined``,
    {} for a checkpoint under its own names) and the warnings of the stats check."""

    plan: Plan
    options: ConvertOptions
    sizes: dict[str, int | None]
    joined: dict[str, list[str]]
    warnings: list[str]

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), "bytes_out_by_recipe": self.sizes,
                **({"joined": self.joined} if self.joined else {})}


def _preset_through_comfyui_names(source):
    """A diffusers-named model the presets know under ComfyUI's names (a Wan, HunyuanVideo... transformer
    written as it is): its preset, detected on the renamed view, with each rule matching the source
    tensors the view's matching tensors are made of. None where no view or preset recognises it."""
    from .comfy_names import RenamedView
    from .errors import QuantkitError
    from .policy import Rule
    from .presets import resolve
    from .sources import COMFYUI_NAMINGS, comfyui_view
    if isinstance(source, RenamedView):
        return None
    try:
        view = comfyui_view(source, COMFYUI_NAMINGS)
    except QuantkitError:
        return None
    preset, why = resolve("auto", view.tensors) if isinstance(view, RenamedView) else (None, "")
    if preset is None or preset.name == "generic":
        return None
    rules = []
    for rule in preset.rules(view.tensors):
        # A tensor that is no attention projection under ComfyUI's name (FLUX.2's single-block linear2,
        # diffusers' attn.to_out) is not one for the recipe either: its rule holds in every recipe.
        for attention in (True, False):
            names = sorted({part[0] for name, parts in view.parts.items() if rule.matches(name)
                            and (_is_attention(view.tensors[name]) is attention) for part in parts})
            if names:
                rules.append(Rule(rule.action, "re:" + "|".join(re.escape(n) for n in names), rule.origin,
                                  rule.every_recipe or not attention))
    return preset, why + " (on the diffusers names' ComfyUI counterparts)", tuple(rules)


def _is_attention(info) -> bool:
    from .policy import TensorKind, classify
    return classify(info.name, info.shape, info.dtype) is TensorKind.ATTENTION


def plan_source(src: str, options: ConvertOptions, *, stats: str | None = None, force_stats: bool = False,
                reports: dict[str, str] | None = None, overwrite: bool = False,
                keep_choice: dict | None = None) -> SourcePlan:
    """Plan the conversion of the checkpoint ``src`` (any layout ``open_source`` reads, under the
    names ``options.format`` writes) from its header alone.

    Args:
        src: the checkpoint (a file, an index, a folder, a pickle).
        options: the conversion's options.
        stats: a stats file from ``calibrate`` of this checkpoint (its ranges, and its granularity
            and FP8 dtype where ``options`` leaves them unset).
        force_stats: use stats of another checkpoint, with a warning instead of a refusal.
        reports: (option -> path) report files the caller writes afterwards, checked first
            (``overwrite`` to replace one).
        keep_choice: the record of the layers ``options`` keeps for a target (``sensitivity.choose_keep``).

    Returns:
        A ``SourcePlan``. Raises ``QuantkitError`` for an unusable source, stats or report path.
    """
    from .comfy_names import joined
    from .destinations import check_report_path, source_reads
    from .formats import get_format
    from .sources import open_source
    warnings: list[str] = []
    loaded = load_stats(stats) if stats else None
    with open_source(src, component=options.component, ema=options.ema,
                     names=get_format(options.format).source_names) as source:
        for option, path in (reports or {}).items():
            check_report_path(path, option, reads=source_reads(source), overwrite=overwrite)
        if loaded is not None:
            check_stats(source, loaded, force=force_stats, warn=warnings.append)
            options = options_with_stats(options, loaded)
        plan = make_plan(source, options, loaded)
        plan.keep_choice = keep_choice
        return SourcePlan(plan, options, recipe_sizes(source, options), joined(source), warnings)
