"""``quantkit calibrate``: weight and activation statistics of a checkpoint, into a stats file.

    >>> calibrate("model", "model.stats.safetensors", ConvertOptions())        # doctest: +SKIP

1. Open the source under its own names and plan it with the options ``convert`` takes
   (``make_plan``): the tensors the plan quantizes are the ones observed.
2. Hash the source's files on a background thread (the SHA256 a convert manifest records as
   ``source.sha256``) and fingerprint its header (``stats.fingerprint``).
3. Weights: each quantized tensor read alone in float32 and fed to the weight observer
   (``absmax``, ``mse``, ``percentile[:Q]``) at the plan's granularity; memory is one tensor.
4. Activations, when a ``config.json`` lies beside the weights (else weights only, with a note):
   the model runs streamed on the calibration inputs (``inputs``) with the activation observer
   (``absmax``, ``ema[:M]``, ``percentile[:Q]``) on every quantized layer's input
   (``activations``).
5. ``--rounding gptq``: the same passes also sum each quantized linear's input Hessian
   (``activations.HessianRecorder``) into the sidecar beside the stats file (``hessians``),
   each written as soon as it is complete; several passes hold a group of layers' Hessians at a
   time (``HESSIAN_BUDGET``) and repeat per group.
6. ``stats.save`` writes the file (temporary name, renamed when complete), naming the sidecar.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from quantkit.calibration import stats as statsfile
from quantkit.calibration.weights import CHUNK_BYTES, chunk_absmax, stack_absmax
from quantkit.calibration.observers import AbsMax, MovingAverage, MSEClip, Observer, Percentile
from quantkit.comfy_names import RenamedView
from quantkit.destinations import check_destination, check_not_source_files, check_report_path, source_reads
from quantkit.errors import NonFiniteError, OptionsError, UnsupportedInputError
from quantkit.formats import get_format
from quantkit.fp8 import FP8Format, Granularity, block_rows, dequantize, quantize, scale_from_absmax
from quantkit.options import Rounding
from quantkit.hashing import BackgroundHash, torch_threads
from quantkit.manifest import source_files, source_name
from quantkit.metrics import FLOOR_MARGIN_DB, peak_to_rms_db, rtn_sqnr_bound, sqnr
from quantkit.plan import ConvertOptions, make_plan
from quantkit.progress import NULL, Progress
from quantkit.runtime.streaming import return_freed_memory
from quantkit.sources import open_source
from quantkit.writer import check_no_other_writer

WEIGHT_OBSERVERS = ("absmax", "mse", "percentile")
ACTIVATION_OBSERVERS = ("absmax", "ema", "percentile")
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ObserverSpec:
    """An observer chosen on the command line: ``absmax``, ``mse``, ``ema:0.9``, ``percentile:99.99``."""

    kind: str
    parameter: float | None = None

    @classmethod
    def parse(cls, text: str, known: tuple[str, ...], option: str) -> "ObserverSpec":
        kind, sep, arg = text.strip().lower().partition(":")
        if kind not in known:
            raise OptionsError(f"{option} {text!r}: unknown observer", hint=f"choose one of {', '.join(known)}")
        if not sep:
            return cls(kind)
        if kind not in ("ema", "percentile"):
            raise OptionsError(f"{option} {text!r}: {kind} takes no parameter", hint=f"write {option} {kind}")
        try:
            value = float(arg)
        except ValueError:
            raise OptionsError(f"{option} {text!r}: {arg!r} is not a number",
                               hint=f"e.g. {option} percentile:99.99 or ema:0.9") from None
        spec = cls(kind, value)
        try:
            spec.make(Granularity.TENSOR)
        except ValueError as exc:
            raise OptionsError(f"{option} {text!r}: {exc}") from None
        return spec

    def make(self, granularity: Granularity, fmt: FP8Format | None = None) -> Observer:
        if self.kind == "absmax":
            return AbsMax(granularity)
        if self.kind == "mse":
            return MSEClip(granularity, fmt) if fmt is not None else MSEClip(granularity)
        if self.kind == "ema":
            return MovingAverage(*(() if self.parameter is None else (self.parameter,)), granularity=granularity)
        if granularity is not Granularity.TENSOR:
            raise OptionsError(f"the percentile observer is per tensor, not per {granularity.value}",
                               hint="use --granularity tensor, or --observer mse / absmax")
        return Percentile(*(() if self.parameter is None else (self.parameter,)))

    def __str__(self) -> str:
        return self.kind if self.parameter is None else f"{self.kind}:{self.parameter:g}"


@dataclass(frozen=True)
class CalibrationSettings:
    """What ``calibrate`` observes and on what (the policy options are a ``ConvertOptions``)."""

    weight_observer: str = "absmax"
    activation_observer: str = "absmax"
    inputs: str = "builtin"                       # or module:function, path/file.py:function
    text_encoders: tuple[str, ...] = ()
    steps: int = 4
    seeds: int = 2
    samples: int | None = None                    # at most this many samples (sentences, diffusion rows, hook batches)
    weights_only: bool = False
    compute_dtype: str = "fp32"
    max_memory: int | None = None                 # bytes: the model runs in budget mode (default streamed)
    rounding: Rounding = Rounding.NEAREST         # GPTQ: also gather each quantized layer's input Hessian

    def __post_init__(self):
        object.__setattr__(self, "rounding", Rounding(self.rounding))
        ObserverSpec.parse(self.weight_observer, WEIGHT_OBSERVERS, "--observer")
        ObserverSpec.parse(self.activation_observer, ACTIVATION_OBSERVERS, "--activation-observer")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise OptionsError(f"--compute-dtype {self.compute_dtype!r}", hint=f"choose {', '.join(COMPUTE_DTYPES)}")
        if self.steps < 1 or self.seeds < 1 or (self.samples is not None and self.samples < 1):
            raise OptionsError("--steps, --seeds and --samples must be at least 1")
        if self.weights_only and self.max_memory is not None:
            raise OptionsError("--max-memory sizes the model run to observe activations; --weights-only runs none",
                               hint="leave one of them out")
        if self.weights_only and self.rounding is Rounding.GPTQ:
            raise OptionsError("--rounding gptq needs the layers' inputs (their Hessians); --weights-only runs no model",
                               hint="leave out --weights-only, or calibrate with --rounding nearest")


@dataclass
class CalibrationResult:
    source: str
    stats_path: str
    stats_sha256: str
    source_sha256: str
    weight_observer: str
    activation_observer: str | None
    granularity: str
    layers: int                       # weights observed
    inputs_observed: int              # layers with an input range
    samples: int
    inputs: str | None
    seconds: float
    peak_bytes: int | None            # weights the streamed model held at most (None: weights only)
    model_bytes: int
    notes: list[str] = field(default_factory=list)
    figures: dict[str, dict] = field(default_factory=dict)

    def largest_inputs(self, n: int = 5) -> list[tuple[str, float]]:
        ranges = [(k, f["input_range"]) for k, f in self.figures.items() if "input_range" in f]
        return sorted(ranges, key=lambda e: -e[1])[:n]

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "figures"}
        d["largest_inputs"] = [{"tensor": k, "range": v} for k, v in self.largest_inputs(10)]
        return d


def calibrate(src: str, out: str, options: ConvertOptions = ConvertOptions(),
              settings: CalibrationSettings = CalibrationSettings(), *, overwrite: bool = False,
              progress: Progress = NULL, reports: dict[str, str] | None = None) -> CalibrationResult:
    """Measure ``src`` (any layout ``open_source`` reads) under ``options`` and write the stats file ``out``.
    Everything that can be refused (paths, plan, observers, the model, its tokenizer, a hook, text
    encoders) is refused before the long work (the weights, the passes) starts."""
    t0 = time.perf_counter()
    weight_spec = ObserverSpec.parse(settings.weight_observer, WEIGHT_OBSERVERS, "--observer")
    act_spec = ObserverSpec.parse(settings.activation_observer, ACTIVATION_OBSERVERS, "--activation-observer")
    check_destination(src, out, overwrite)
    check_no_other_writer(out)
    fmt = get_format(options.format)
    # Planned as convert plans it (a format may read the source under ComfyUI's names); measured and
    # recorded under the checkpoint's own names.
    with open_source(src, component=options.component, ema=options.ema, names=fmt.source_names) as view, \
            torch_threads(1):
        source = view.original if isinstance(view, RenamedView) else view
        check_not_source_files(source, out)
        for option, path in (reports or {}).items():
            check_report_path(path, option, reads=source_reads(source), writes=[out], overwrite=overwrite)
        plan = make_plan(view, options)
        if plan.source_format is not None:
            raise UnsupportedInputError(f"already quantized ({plan.source_format})", path=source.path,
                                        hint="calibrate the BF16/FP16/FP32 checkpoint it was made from")
        options = plan.options
        weight_spec.make(options.granularity, options.fp8)         # refuse percentile per channel before work
        for w in plan.warnings:
            progress.warn(w)
        quantized = [source.tensors[n] for n in sorted(own_names(view, plan))]
        with BackgroundHash(source.files) as hashing:
            feed, notes = _feed(source, settings, progress)
            figures: dict[str, dict] = {}
            gather = _hessian_plan(source, quantized, feed, out, overwrite) \
                if settings.rounding is Rounding.GPTQ else None
            try:
                weights = _weights(source, quantized, weight_spec, options, figures, progress, notes)
                acts = None if feed is None else _activations(feed, source, {i.name for i in quantized}, act_spec,
                                                              settings, figures, progress, gather)
                hessians = None if gather is None else _hessian_record(gather, notes)
            finally:
                if gather is not None:
                    gather.sink.abort()       # a no-op once finished
            sha = hashing.result()
        per_sample = sorted(k for k, v in (acts.inputs if acts else {}).items() if v.per_sample)
        if per_sample:
            # One vector per sample: a range from a few dozen vectors clips the next prompt's (measured on
            # FLUX's and SD3's modulation: 25 dB at the layer's input instead of 32 with scale 1, -2 dB at the
            # output), and an FP8 matmul of one row per image buys nothing. Their layers stay weight-only.
            notes.append(f"{len(per_sample)} per-sample projection(s) (one input vector per sample: modulation, "
                         f"embedders) get no static input range; they run weight-only by design, nothing to do: "
                         f"{', '.join(per_sample[:3])}{' ...' if len(per_sample) > 3 else ''}")
        if acts is not None and acts.unobserved:
            notes.append(f"{len(acts.unobserved)} quantized layer(s) never ran on the inputs, no input range "
                         f"(they run weight-only; inputs that reach them, --inputs module:function, give them one): "
                         f"{', '.join(acts.unobserved[:3])}{' ...' if len(acts.unobserved) > 3 else ''}")
        result_stats = statsfile.Stats(
            source=_source_record(src, source, hashing.digests, sha), granularity=options.granularity,
            fp8=options.fp8, weight_observer=str(weight_spec), weights=weights,
            activations={k: _range(v) for k, v in (acts.inputs if acts else {}).items() if not v.per_sample},
            activation_observer=str(act_spec) if acts else None, samples=acts.samples if acts else 0,
            inputs=acts.words if acts else None, options=_options_record(options, settings), layers=figures,
            hessians=hessians)
        try:
            digest = statsfile.save(result_stats, out, overwrite=overwrite)
        except BaseException:
            if gather is not None:        # a sidecar no stats file names: not left under its final name
                gather.sink.remove()
            raise
    progress.close()
    return CalibrationResult(
        source=src, stats_path=out, stats_sha256=digest, source_sha256=sha, weight_observer=str(weight_spec),
        activation_observer=result_stats.activation_observer, granularity=options.granularity.value,
        layers=len(weights), inputs_observed=len(result_stats.activations), samples=result_stats.samples,
        inputs=result_stats.inputs, seconds=time.perf_counter() - t0, peak_bytes=acts.peak_bytes if acts else None,
        model_bytes=getattr(source, "file_size", 0), notes=notes, figures=figures)


def own_names(view, plan) -> set[str]:
    """The checkpoint's own names of the tensors ``plan`` quantizes (planned on ``view``: the checkpoint,
    or a ``RenamedView`` of it, whose joined q/k/v tensor names each of its parts)."""
    names = {t.name for t in plan.quantized()}
    if not isinstance(view, RenamedView):
        return names
    return {part[0] for name in names for part in view.parts[name]}


def _range(layer) -> torch.Tensor:
    return layer.observer.statistic().float().reshape(())


def _weights(source, infos, spec: ObserverSpec, options: ConvertOptions, figures: dict, progress,
             notes: list[str]) -> dict:
    """Weight statistic of each tensor in ``infos`` (file order), with its absmax and RMS. Absmax is
    streamed a chunk of rows at a time (memory: one chunk); mse and percentile need the whole tensor
    at once (memory: one tensor in float32), and a statistic below the absmax clips: the weight's SQNR
    with it is measured, and those below validate's default floor are named in ``notes``."""
    progress.stage("weights", sum(i.nbytes for i in infos))
    out = {}
    clipped = []             # (SQNR dB, floor dB, name): the converted weight would fail validate
    for info in sorted(infos, key=lambda i: (getattr(i, "start", 0), i.name)):
        whole = spec.kind != "absmax"
        parts, squares, values = [], 0.0, 0
        kept = [] if whole else None
        for _, _, x in source.iter_rows(info, CHUNK_BYTES, block_rows(options.granularity)):
            x = x.float()
            amax, bad = chunk_absmax(x, options.granularity, options.allow_nonfinite, source.path, info.name)
            if bad:
                x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype))
            parts.append(amax)
            squares += float(x.double().square().sum())
            values += x.numel()
            if whole:
                kept.append(x.clone())            # the reader reuses its buffer for the next chunk
        absmax = stack_absmax(parts, info.shape, options.granularity)
        if whole:
            observer = spec.make(options.granularity, options.fp8)
            whole_x = torch.cat(kept).reshape(info.shape) if kept else torch.zeros(info.shape)
            observer.update(whole_x)
            out[info.name] = observer.statistic().float()
            peak = float(absmax.amax()) if absmax.numel() else 0.0
            sqnr = _weight_sqnr(whole_x, out[info.name], options)
            floor = rtn_sqnr_bound(peak_to_rms_db(values, squares, peak), options.fp8) - FLOOR_MARGIN_DB
            if sqnr < floor:
                clipped.append((sqnr, floor, info.name))
            del kept, observer, whole_x
            return_freed_memory()         # the search's temporaries, a few tensors' worth, back to the system
        else:
            out[info.name] = absmax
        figures[info.name] = {"weight_absmax": float(absmax.amax()) if absmax.numel() else 0.0,
                              "weight_rms": math.sqrt(squares / values) if values else 0.0}
        progress.advance(info.nbytes)
    if clipped:
        sqnr, floor, name = min(clipped)
        notes.append(f"{len(clipped)} weight(s) clipped by the {spec} statistic below validate's default floor "
                     f"(lowest: {name}, SQNR {sqnr:.1f} dB < {floor:.1f} dB): a convert --stats with this file fails "
                     f"validate on them; for weights use --observer absmax (the default) or mse")
    return out


def _weight_sqnr(x: torch.Tensor, statistic: torch.Tensor, options: ConvertOptions) -> float:
    """SQNR (dB) of ``x`` quantized to nearest with the scale of ``statistic`` (its range) and back."""
    g = options.granularity
    scale = scale_from_absmax(statistic, options.fp8)
    return sqnr(x, dequantize(quantize(x, scale, g, options.fp8), scale, g).reshape(x.shape))


@dataclass
class _Observed:
    inputs: dict
    samples: int
    words: str
    peak_bytes: int
    unobserved: list[str]


def _feed(source, settings: CalibrationSettings, progress) -> tuple[tuple | None, list[str]]:
    """(the model and its calibration inputs, or None: weights only), and notes: built before any long
    work, so a missing tokenizer or a broken hook is refused at once."""
    from quantkit.calibration.inputs import model_inputs
    from quantkit.models import build_model
    folder = os.path.dirname(os.path.abspath(source.files[0]))
    if settings.weights_only:
        return None, ["weights only (--weights-only): no input ranges"]
    if not os.path.isfile(os.path.join(folder, "config.json")):
        if settings.inputs != "builtin" or settings.text_encoders:
            raise UnsupportedInputError("--inputs and --text-encoder feed the model, which is built from the "
                                        "config.json beside the weights; there is none", path=folder,
                                        hint="calibrate the model folder, or pass --weights-only")
        return None, [f"no config.json beside the weights ({folder}): weights only, no input ranges "
                      "(calibrate a model folder to measure activations)"]
    model = build_model(source, with_inputs=False)
    return (model, model_inputs(model, source, settings, COMPUTE_DTYPES[settings.compute_dtype], progress)), []


def _activations(feed, source, quantized: set[str], spec: ObserverSpec, settings: CalibrationSettings, figures: dict,
                 progress, hessians=None) -> _Observed:
    from quantkit.calibration.activations import observe
    model, inputs = feed
    acts = observe(model, source, inputs.batches, quantized, lambda: spec.make(Granularity.TENSOR),
                   dtype=COMPUTE_DTYPES[settings.compute_dtype], progress=progress, masks=inputs.masks,
                   max_memory=settings.max_memory, hessians=hessians)
    for name, layer in acts.inputs.items():
        if not math.isfinite(float(_range(layer))):
            raise NonFiniteError("the input of this layer held NaN/Inf on the calibration inputs", path=source.path,
                                 tensor=name, hint="calibrate in --compute-dtype fp32, or check the inputs")
        figures.setdefault(name, {}).update({"input_absmax": layer.absmax, "input_rms": layer.rms,
                                             "input_values": layer.values,
                                             "input_range": float(_range(layer)),
                                             "input_per_sample": layer.per_sample})
    return _Observed(acts.inputs, inputs.samples, inputs.words, acts.peak_bytes, acts.unobserved)


# Float32 Hessians held at once when the calibration takes several passes (each pass adds to every
# layer's): past this, the layers are split in groups and the passes repeated per group. One pass (the
# diffusers default, 8 rows) needs no groups: a Hessian is complete, written and dropped once its layer ran.
HESSIAN_BUDGET = 1 << 30


def _hessian_plan(source, quantized, feed, out: str, overwrite: bool):
    """The sidecar writer and the groups of layers whose Hessians are gathered together."""
    from quantkit.calibration.activations import HessianPlan
    from quantkit.calibration.hessians import HessianWriter, sidecar_path
    if feed is None:
        raise OptionsError("--rounding gptq needs the layers' inputs, and this source has no config.json to build "
                           "the model from", hint="calibrate the model folder, or use --rounding nearest")
    linear = sorted((i for i in quantized if len(i.shape) == 2), key=lambda i: (getattr(i, "start", 0), i.name))
    groups, size = [set()], 0
    for info in linear:
        need = 4 * info.shape[1] ** 2
        if len(feed[1].batches) > 1 and groups[-1] and size + need > HESSIAN_BUDGET:
            groups.append(set())
            size = 0
        groups[-1].add(info.name)
        size += need
    return HessianPlan(HessianWriter(sidecar_path(out), [i.name for i in linear], overwrite=overwrite), groups)


def _hessian_record(gather, notes: list[str]) -> dict:
    """Finish the sidecar; the stats file's record of it."""
    record = gather.sink.finish()
    record["layers"] = {t: k for t, k in sorted(gather.shared.items()) if k in record["tokens"]}
    record["per_sample"] = sorted(gather.per_sample)
    notes.append(f"GPTQ Hessians of {len(record['layers'])} layer(s) ({len(record['tokens'])} distinct inputs) in "
                 f"{record['file']} ({record['bytes'] / 1e9:.3g} GB), gathered in {len(gather.groups)} group(s) "
                 "of passes")
    return record


def _source_record(src: str, source, digests: dict[str, str], sha: str) -> dict:
    """The stats' record of the source: name, combined SHA256, size, header fingerprint, files."""
    return {"name": source_name(src), "sha256": sha, "bytes": getattr(source, "file_size", 0),
            "fingerprint": statsfile.fingerprint(source.tensors), "files": source_files(src, source.files, digests)}


def _options_record(o: ConvertOptions, s: CalibrationSettings) -> dict:
    return {"format": o.format, "preset": o.preset, "recipe": o.recipe.value, "granularity": o.granularity.value,
            "fp8": o.fp8.name, "rules": [[r.action.value, r.typed] for r in o.policy.rules],
            "quantize_conv": o.policy.quantize_conv, "component": o.component, "ema": o.ema,
            "inputs": s.inputs, "text_encoders": list(s.text_encoders), "steps": s.steps, "seeds": s.seeds,
            "samples": s.samples, "compute_dtype": s.compute_dtype, "rounding": s.rounding.value}


SORTS = ("range", "outlier")


def layer_table(stats: statsfile.Stats, sort: str = "range") -> list[dict]:
    """One row per layer of a stats file, for ``stats show``: weight and input range, RMS and outlier
    ratio (absmax / RMS: how far the largest value sits above the typical one; a large ratio is what
    a per-tensor FP8 scale handles worst), largest first by input range (``range``, the weight's where
    there is none) or by outlier ratio (``outlier``)."""
    if sort not in SORTS:
        raise OptionsError(f"--sort {sort!r}", hint=f"choose {', '.join(SORTS)}")
    rows = []
    for name in sorted(set(stats.weights) | set(stats.activations) | set(stats.layers)):
        f = stats.layers.get(name, {})
        w = stats.weights.get(name)
        a = stats.activations.get(name)
        row = {"tensor": name, "weight_range": float(w.amax()) if w is not None and w.numel() else None,
               "weight_absmax": f.get("weight_absmax"), "weight_rms": f.get("weight_rms"),
               "input_range": float(a) if a is not None else None, "input_absmax": f.get("input_absmax"),
               "input_rms": f.get("input_rms"), "input_values": f.get("input_values"),
               "input_per_sample": bool(f.get("input_per_sample"))}
        row["weight_outlier"] = _ratio(row["weight_absmax"], row["weight_rms"])
        row["input_outlier"] = _ratio(row["input_absmax"], row["input_rms"])
        rows.append(row)

    def key(r):
        first = r["input_range"] if sort == "range" else r["input_outlier"]
        second = r["weight_range"] if sort == "range" else r["weight_outlier"]
        return (-(first if first is not None else -1.0), -(second if second is not None else -1.0), r["tensor"])
    return sorted(rows, key=key)


def _ratio(a, b) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None
