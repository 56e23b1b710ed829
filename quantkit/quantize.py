"""Quantize stage: stream a checkpoint through the plan into an output format.

    header -> plan -> calibrate (per-tensor absmax, while the source hashes on the other core)
           -> write header -> per tensor: quantize / cast / copy, chunk by chunk -> fsync, rename -> manifest

Four things run at once: the math, the source's SHA256, the output's SHA256 (computed from
the buffers the codes are cast into) and the writes of those buffers (O_DIRECT where the
filesystem takes it; ``writer._Sink``). Neither hash waits for the other: the source's SHA256
goes to the manifest, and the output's header names the source without its hash. A sharded
output is written by several processes at once (``jobs``), a shard each, and its source files
hashed alongside.
Per-channel and per-block scales need no calibration pass: a chunk holds whole rows (whole
128-row tile rows), so its scales are computed right before it is quantized.

Memory is a few chunk buffers, whatever the checkpoint's size: no tensor is ever read whole.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from . import fp8 as fp8math
from ._version import __version__
from .calibration import collect_weight_stats
from .calibration.weights import chunk_absmax, stack_absmax
from .errors import NonFiniteError, OptionsError, QuantkitError, UnsupportedInputError
from .formats import Role, get_format
from .sources import open_source
from .destinations import check_destination, check_not_source_files, check_report_path, output_paths, source_reads
from .hashing import BackgroundHash, combined_digest, sha256_file, torch_threads
from .manifest import file_entry, manifest_path, read_manifest, source_files, source_name, write_manifest
from .metrics import ScaleFit
from .calibration.stats import Stats, mismatch as stats_mismatch
from .calibration.hessians import GPTQRounder
from .options import Rounding
from .plan import (ConvertOptions, Plan, PlannedTensor, check_stats, load_stats, make_plan, options_with_stats,
                   stats_fit_warnings)
from .policy import Action
from .progress import NULL, Progress
from .reader import SafetensorsFile, chunk_rows
from .shards import INDEX_NAME, index_document, oversized_note, shard_names, split_emits
from .workers import cap_jobs, default_jobs, run_pieces
from .writer import SafetensorsWriter, TempFolder, check_no_other_writer, remove_stale_temps

# Source bytes per chunk: small enough that the float32 work buffer stays in cache, large
# enough that per-call overhead vanishes (2 MiB measured fastest on a 2-core EPYC).
CHUNK_BYTES = 2 << 20

SOURCE_SHA_KEY = "quantkit.source_sha256"
# Source metadata not carried into the output: quantkit's own provenance, and ComfyUI's
# per-layer config of an already-quantized source (a format that wants it writes its own).
DROPPED_METADATA = ("_quantization_metadata",)


@dataclass
class ConvertResult:
    source: str
    destination: str
    manifest: str
    format: str
    recipe: str
    granularity: str
    fp8: str
    counts: dict[str, int]
    bytes_in: int
    bytes_out: int
    seconds: float
    source_sha256: str
    output_sha256: str
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict | None = None            # the stats file used (plan.stats), if any
    jobs: int = 1                        # processes that wrote the output
    workers_peak_rss_bytes: int = 0      # the sum of the worker processes' peaks (jobs > 1)
    keep_choice: dict | None = None      # the layers kept for a target (sensitivity.choose_keep), if any

    @property
    def gb_per_s(self) -> float:
        return self.bytes_in / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**self.__dict__, "gb_per_s": round(self.gb_per_s, 3)}


def convert(src: str, dst: str, options: ConvertOptions = ConvertOptions(), *, overwrite: bool = False,
            progress: Progress = NULL, reports: dict[str, str] | None = None, jobs: int | None = None,
            stats: Stats | str | None = None, force_stats: bool = False,
            keep_choice: dict | None = None) -> ConvertResult:
    """Convert the checkpoint ``src`` (any layout ``open_source`` reads) into ``dst``.

    Nothing appears under ``dst`` until the output is complete, hashed and its manifest written.

    Args:
        src: a safetensors file, a sharded checkpoint's index or folder, a model folder, or a pickle.
        dst: the output: a file, or a folder for folder formats (compressed-tensors) and sharded
            outputs (``options.max_shard_bytes``).
        options: format, FP8 dtype, granularity, keep dtype, preset and rules (``ConvertOptions``).
        overwrite: replace an existing ``dst``.
        progress: receives stages, bytes done and warnings (``quantkit.progress.NULL``: none).
        reports: option -> path (``{"--json": "r.json"}``) of files the caller writes afterwards,
            checked with the output's rules before any work.
        jobs: processes converting the shards of a sharded output side by side (None: as many as
            the cores and memory allow); the output is the same, byte for byte, whatever the number.
        stats: a ``Stats`` or the path of a stats file ``quantkit calibrate`` wrote: weight scales
            from its ranges and static activation scales where the format has a place for them.
            Granularity and FP8 dtype are the stats' where ``options`` leaves them unset
            (``ConvertOptions.from_strings(granularity=None, fp8=None)``); set ones must agree.
        force_stats: stats of another checkpoint are refused before any work (header fingerprint)
            and before the output is published (the source's SHA256, hashed while converting),
            naming both SHA256s; this turns both refusals into warnings.
        keep_choice: the record of the layers ``options`` keeps for a target
            (``sensitivity.choose_keep(...).to_dict()``), written to the manifest.

    Returns:
        A ``ConvertResult``: where the output and its manifest are, what was asked, counts per action,
        sizes, seconds, the source's and the output's SHA256, warnings.

    Raises:
        QuantkitError: a subclass naming the file, the tensor and the fix (bad input, a refused
            plan, a full disk...); nothing is left under ``dst``.

    >>> convert("model.safetensors", "model-fp8.safetensors", stats="model.stats.safetensors")  # doctest: +SKIP

    >>> convert("model.safetensors", "model-fp8.safetensors")     # doctest: +SKIP
    """
    t0 = time.perf_counter()
    stats, stats_sha = _load_stats(stats)
    fmt = get_format(options.format)
    as_folder = fmt.folder or options.max_shard_bytes is not None
    check_destination(src, dst, overwrite, as_folder)
    check_no_other_writer(dst)
    stale = remove_stale_temps(dst) + ([] if as_folder else remove_stale_temps(manifest_path(dst)))
    for path in stale:
        progress.warn(f"removed a temporary file left by an interrupted run: {path}")
    with open_source(src, component=options.component, ema=options.ema, names=fmt.source_names) as source, \
            torch_threads(1):
        check_not_source_files(source, dst)
        for option, path in (reports or {}).items():
            check_report_path(path, option, reads=source_reads(source), writes=output_paths(dst), overwrite=overwrite)
        same_header = stats is not None and check_stats(source, stats, force=force_stats, warn=progress.warn)
        if stats is not None:
            options = options_with_stats(options, stats)
        plan = make_plan(source, options, stats)
        plan.keep_choice = keep_choice
        if plan.stats is not None:
            plan.stats["sha256"] = stats_sha
        options = plan.options            # an FP8 source may have supplied granularity and FP8 dtype
        for w in plan.warnings:
            progress.warn(w)
        # The source's SHA256 goes to the manifest, not into the header: a header naming it
        # could not be hashed before the source's hash ends, and the output's own SHA256 would
        # then be a second pass after it (see benchmarks/README.md). The header names the source.
        metadata = {**{k: v for k, v in source.metadata.items()
                       if not k.startswith("quantkit.") and k not in DROPPED_METADATA},
                    **fmt.metadata(plan, {"quantkit.source": source_name(src)})}
        groups = _shards(plan, options) if as_folder else [plan.outputs]
        too_small = options.max_shard_bytes and oversized_note(groups, options.max_shard_bytes)
        if too_small:
            plan.warnings.append(too_small)
            progress.warn(too_small)
        jobs, jobs_note = _jobs(jobs, groups, source)
        run = _Run(source, plan, fmt, metadata, progress)
        run.rounder = _rounder(options, stats, source)
        if same_header:         # (forced stats of another header were warned about already)
            run.check_source = lambda digests: _check_stats_source(stats, digests, src, force_stats, progress)
        if not as_folder:
            output_sha, files, source_digests = run.one_file(dst, overwrite, lambda out: _manifest(src, out, run, options))
        else:
            with TempFolder(dst) as folder:
                try:
                    output_sha, files, source_digests = run.folder(folder.path, groups, jobs)
                    _manifest(src, folder.path, run, options)
                except QuantkitError as exc:     # name the output's file, not its temporary folder
                    if exc.path and exc.path.startswith(folder.path + os.sep):
                        exc.path = os.path.join(dst, exc.path[len(folder.path) + 1:])
                    raise
                folder.commit()
        manifest = manifest_path(dst)
    for w in stats_fit_warnings(run.fits):       # measured while writing: the output is there, validate fails it
        progress.warn(w)
        plan.warnings.append(w)
    progress.close()
    summary = plan.summary()
    return ConvertResult(
        source=src, destination=dst, manifest=manifest, format=summary["format"], recipe=summary["recipe"],
        granularity=summary["granularity"], fp8=summary["fp8"], counts=summary["counts"], bytes_in=plan.bytes_in,
        bytes_out=sum(f["bytes"] for f in files.values()), seconds=time.perf_counter() - t0,
        source_sha256=combined_digest(source_digests), output_sha256=output_sha, warnings=plan.warnings,
        notes=[*plan.notes, *([jobs_note] if jobs_note else []), *_rounding_notes(run.rounder)],
        stats=plan.stats, jobs=run.jobs, workers_peak_rss_bytes=run.workers_peak_rss, keep_choice=keep_choice)


def _jobs(jobs: int | None, groups: list[list], source) -> tuple[int, str | None]:
    """The processes writing ``groups`` (and hashing the source's files): ``jobs`` as asked,
    bounded by those pieces of work (a sharded output's), the cores and the free memory, with a
    line saying so when that caps it; None: the default for this machine."""
    if len(groups) <= 1:        # one file: one process writes it, whatever was asked
        note = None if jobs is None or jobs <= 1 else (
            f"--jobs {jobs} has nothing to share out: the output is one file, written by one process "
            "(--max-shard-size cuts it into shards that --jobs writes side by side)")
        return 1, note
    pieces = len(groups) + len(source.files)
    if jobs is None:
        return min(default_jobs(), pieces), None
    return cap_jobs(jobs, pieces)


def _shards(plan: Plan, options: ConvertOptions) -> list[list]:
    """The output's tensors cut into its files: shards when ``max_shard_bytes`` asks for them."""
    limit = options.max_shard_bytes
    return split_emits(plan.outputs, limit) if limit is not None else [plan.outputs]


def _manifest(src: str, output: str, run: "_Run", options: ConvertOptions) -> str:
    conversion = plan_summary(run.plan)
    if run.rounder is not None:
        conversion["rounding"] = run.rounder.describe()
    return write_manifest(output, files=run.files, source=_source_entry(src, run.source, run.source_digests, options),
                          conversion=conversion)


def _rounder(options: ConvertOptions, stats: Stats | None, source) -> GPTQRounder | None:
    """GPTQ's Hessians for ``--rounding gptq`` (refused before any work without them), or None."""
    if options.rounding is not Rounding.GPTQ:
        return None
    if stats is None or not stats.hessians:
        where = f"the stats file {stats.path} has none" if stats is not None else "no --stats was given"
        raise OptionsError(f"--rounding gptq needs the layers' input Hessians; {where}",
                           hint="run quantkit calibrate SRC -o STATS --rounding gptq (same policy options), then "
                                "convert with --stats STATS --rounding gptq; or use --rounding nearest")
    return GPTQRounder(stats, source)


def _rounding_notes(rounder: GPTQRounder | None) -> list[str]:
    if rounder is None:
        return []
    note = f"--rounding gptq: {len(rounder.rounded)} tensor(s) rounded by GPTQ"
    if rounder.nearest:
        reasons = sorted(set(rounder.nearest.values()))
        note += (f", {len(rounder.nearest)} to nearest ({'; '.join(reasons[:3])}: "
                 f"{', '.join(sorted(rounder.nearest)[:3])}{' ...' if len(rounder.nearest) > 3 else ''})")
    return [note]


class _Run:
    """One conversion's writing: a file, or a folder's shards in this process or in ``jobs``
    worker processes. Fills ``files`` (name -> sha256, bytes) and ``source_digests`` (source
    file -> its SHA256), both hashed while the output is written."""

    def __init__(self, source, plan: Plan, fmt, metadata: dict, progress: Progress):
        self.source, self.plan, self.fmt, self.metadata, self.progress = source, plan, fmt, metadata, progress
        self.files: dict[str, dict] = {}
        self.source_digests: dict[str, str] = {}
        self.jobs, self.workers_peak_rss = 1, 0
        self.fits: dict[str, ScaleFit] = {}       # how the stats' scales fit their weights (ScaleFit)
        self.rounder: GPTQRounder | None = None   # --rounding gptq
        # Called with the source's digests once hashed, before anything is published (stats' SHA256).
        self.check_source = lambda digests: None

    def one_file(self, dst: str, overwrite: bool, manifest) -> tuple[str, dict, dict]:
        with BackgroundHash(self.source.files) as source_hash:
            scales = _calibrate(self.source, self.plan, self.progress)
            self.progress.stage("quantize", self.plan.bytes_in)

            def publish(digest: str, nbytes: int) -> None:      # the manifest lands before the output
                self.files[os.path.basename(dst)] = {"sha256": digest, "bytes": nbytes}
                source_hash.result()
                self.source_digests = source_hash.digests
                self.check_source(self.source_digests)
                manifest(dst)
            digest = _write(self.source, self.plan, self.plan.outputs, scales, dst, self.metadata, overwrite,
                            self.progress, before_publish=publish, fits=self.fits, rounder=self.rounder)
        return digest, self.files, self.source_digests

    def folder(self, folder: str, groups: list[list], jobs: int) -> tuple[str, dict, dict]:
        """The weights in ``folder`` (shards and their index when there are several), then the
        format's other files; returns the weights' SHA256 (several shards: ``combined_digest``)."""
        names = shard_names(len(groups)) if len(groups) > 1 else [self.fmt.weights_name]
        if jobs > 1 and len(groups) > 1 and hasattr(os, "fork"):
            digests = self._in_workers(folder, names, groups, jobs)
        else:
            with BackgroundHash(self.source.files) as source_hash:
                scales = _calibrate(self.source, self.plan, self.progress)
                self.progress.stage("quantize", self.plan.bytes_in)
                digests = {name: _write(self.source, self.plan, group, scales, os.path.join(folder, name),
                                        self.metadata, False, self.progress, fits=self.fits, rounder=self.rounder)
                           for name, group in zip(names, groups)}
                source_hash.result()
                self.source_digests = source_hash.digests
        self.check_source(self.source_digests)
        for name in names:
            self.files[name] = file_entry(os.path.join(folder, name), digests[name])
        extra = []
        if len(groups) > 1:
            doc = index_document(dict(zip(names, groups)))
            with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(doc, indent=2) + "\n")
            extra.append(INDEX_NAME)
        extra.extend(self.fmt.finalize(folder, self.plan, self.source))
        for name in extra:
            path = os.path.join(folder, name)
            self.files[name] = file_entry(path, sha256_file(path))
        return combined_digest(digests), self.files, self.source_digests

    def _in_workers(self, folder: str, names: list[str], groups: list[list], jobs: int) -> dict[str, str]:
        """Each shard written, and each source file hashed, by one of ``jobs`` forked processes,
        the longest pieces first. A shard's tensors are calibrated by the worker writing it: the
        scales are the same as in one process (each depends on its tensor alone)."""
        def work(piece):
            kind, key = piece
            if kind == "hash":
                return sha256_file(key)
            group = groups[key]
            scales, fits = _calibrate(self.source, self.plan, NULL, group), {}
            digest = _write(self.source, self.plan, group, scales, os.path.join(folder, names[key]), self.metadata,
                            False, NULL, fits=fits, rounder=self.rounder)
            # what this process rounded how (a forked worker's rounder is its own copy)
            rounded = (self.rounder.rounded, self.rounder.nearest) if self.rounder is not None else None
            return digest, fits, rounded

        by_name = {t.name: t for t in self.plan.tensors}
        size = {("hash", f): os.path.getsize(f) for f in self.source.files}
        for i, group in enumerate(groups):
            # A shard's reads, math, writes and output hash: ~2.5x the CPU of hashing as many source
            # bytes (1.5 vs 0.6 CPU-s per GB measured): the order puts the longest pieces first.
            size[("shard", i)] = int(2.5 * sum(by_name[e.source].info.nbytes for e in group
                                               if e.role is Role.DATA and e.source in by_name))
        pieces = sorted(size, key=size.get, reverse=True)
        self.progress.stage("quantize", sum(size.values()))

        def done(i, _):
            self.progress.advance(size[pieces[i]])
        results, self.workers_peak_rss = run_pieces(work, pieces, jobs, done)
        self.jobs = jobs
        out = dict(zip(pieces, results))
        self.source_digests = {f: out[("hash", f)] for f in self.source.files}
        for i in range(len(names)):
            self.fits.update(out[("shard", i)][1])
            if self.rounder is not None:
                self.rounder.merge(*out[("shard", i)][2])
        return {name: out[("shard", i)][0] for i, name in enumerate(names)}


def _load_stats(stats) -> tuple[Stats | None, str | None]:
    """(stats, the stats file's SHA256): a path is read (a missing, corrupt or foreign file is a
    one-line error) and hashed for the records."""
    if stats is None:
        return None, None
    if not isinstance(stats, Stats):
        stats = load_stats(os.fspath(stats))
    return stats, sha256_file(stats.path) if stats.path and os.path.isfile(stats.path) else None


def _check_stats_source(stats: Stats, digests: dict[str, str], src: str, force: bool, progress: Progress) -> None:
    """The source's SHA256, computed while converting, must be the one the stats were calibrated on."""
    sha = combined_digest(digests)
    if sha == stats.source_sha256:
        return
    error = stats_mismatch(stats, sha, src)
    if not force:
        raise error
    progress.warn(f"--force-stats: {error.message}")


def _source_entry(src: str, source, digests: dict[str, str], options: ConvertOptions) -> dict:
    """The manifest's record of the source: its name, combined SHA256, size, layout and the
    choices that select its tensors (component, EMA), and every file with its own SHA256."""
    return {"name": source_name(src), "sha256": combined_digest(digests), "bytes": source.file_size,
            "layout": source.layout, "component": options.component, "ema": options.ema, "names": source.renamed,
            "made_from": _made_from(src, source), "files": source_files(src, source.files, digests)}


def _made_from(src: str, source) -> dict | None:
    """The original an FP8 source that quantkit wrote was made from: its manifest's source record
    (name, SHA256, and how it was opened: component, EMA, naming), or, when that source was itself a
    conversion of a conversion, the original its own record names (``validate --against`` takes the
    chain's first file). An output of quantkit before 0.2 named it in its header."""
    if source.metadata.get(SOURCE_SHA_KEY):
        return {"name": source.metadata.get("quantkit.source"), "sha256": source.metadata[SOURCE_SHA_KEY]}
    if "quantkit.source" not in source.metadata:
        return None
    recorded = _recorded_source(src)
    if not (isinstance(recorded, dict) and isinstance(recorded.get("sha256"), str)):
        return None
    chain = recorded.get("made_from")
    if isinstance(chain, dict) and isinstance(chain.get("sha256"), str):
        return chain
    return {"name": recorded.get("name"), "sha256": recorded["sha256"],
            **{k: recorded.get(k) for k in ("component", "ema", "names")}}


def _recorded_source(src: str):
    """The source record of the manifest of the quantkit output ``src`` (a file, a folder output, a
    file inside one or its shard index); None without a manifest that parses."""
    folder = os.path.dirname(os.path.abspath(src))
    for output in (src, folder) if not os.path.isdir(src) else (src,):
        try:
            manifest = read_manifest(output)
        except QuantkitError:        # no manifest there, or not one that parses
            continue
        if output == folder and os.path.basename(src) not in manifest.get("files", {}):
            continue                 # a folder's manifest that does not list this file
        return manifest.get("source")
    return None


def _calibrate(source: SafetensorsFile, plan: Plan, progress: Progress, emits: list | None = None) -> dict:
    """Scales of the quantized tensors (of ``emits``, one shard's; else all) that need them before
    their data is written: from weight absmax, or carried over from an FP8 source, then rounded to the dtype the format
    stores them in (quantization uses the stored value, so W = q * scale holds exactly for
    what is on disk). The others get theirs chunk by chunk while they are quantized."""
    options = plan.options
    wanted = {t.name for t in plan.quantized()} if emits is None else {e.source for e in emits}
    first = _scaled_first(plan) & wanted
    fresh = [t.info for t in plan.quantized()
             if t.prequantized is None and t.name in first and t.name not in plan.weight_ranges]
    progress.stage("calibrate", sum(i.nbytes for i in fresh))
    stats = collect_weight_stats(source, fresh, options.granularity, options.allow_nonfinite,
                                 progress=progress.advance)
    scales = {name: fp8math.scale_from_absmax(s.absmax, options.fp8) for name, s in stats.items()}
    # A stats file's range: the scale without reading the weight (a range below its absmax clips:
    # quantizing saturates at the FP8 maximum). The weight's NaN/Inf are still refused while it is written.
    scales.update({name: fp8math.scale_from_absmax(rng, options.fp8) for name, rng in plan.weight_ranges.items()
                   if name in wanted})
    for t in plan.quantized():
        if t.prequantized is not None and t.name in wanted:
            scales[t.name] = source.read_tensor(source.tensors[t.prequantized.scale_key]).float()
    stored_as = _scale_dtypes(plan)
    return {name: _stored(scale, stored_as[name], source.path, name) if name in stored_as else scale
            for name, scale in scales.items()}


def _scaled_first(plan: Plan) -> set[str]:
    """Quantized tensors whose scale must be known before their first chunk is quantized: all
    of them per tensor (one absmax over the whole weight); per channel / block only those whose
    scale the format lays out before the weight (chunks hold whole rows or 128-row tile rows,
    so the others' scales are computed chunk by chunk, in the quantizing pass)."""
    if plan.options.granularity is fp8math.Granularity.TENSOR:
        return {t.name for t in plan.quantized()}
    written, first = set(), set()
    for emit in plan.outputs:
        if emit.role is Role.DATA:
            written.add(emit.source)
        elif emit.role is Role.SCALE and emit.source not in written:
            first.add(emit.source)
    return first


def _scale_dtypes(plan: Plan) -> dict:
    """Source tensor -> the dtype its scale is stored in."""
    return {e.source: e.spec.dtype for e in plan.outputs if e.role is Role.SCALE}


def _stored(scale: torch.Tensor, dtype, path: str, name: str) -> torch.Tensor:
    """``scale`` rounded to the dtype it is stored in (as float32); it must stay finite and nonzero."""
    stored = scale.to(dtype.torch)
    if not bool(torch.isfinite(stored).all()) or bool((stored == 0).any()):
        raise UnsupportedInputError(f"a scale does not fit in {dtype.code}", path=path, tensor=name,
                                    hint="this format stores scales in the model's dtype; keep this tensor with --keep")
    return stored.float().reshape(scale.shape)


def _write(source, plan: Plan, emits: list, scales: dict, path: str, metadata: dict, overwrite: bool, progress,
           before_publish=None, fits: dict | None = None, rounder: GPTQRounder | None = None) -> str:
    """Stream the output tensors ``emits`` (all of ``plan.outputs``, or one shard's) into the
    safetensors file ``path``; returns its SHA256.

    Tensors without an entry in ``scales`` get theirs while they are quantized (added to ``scales``).
    ``before_publish(sha256, bytes)`` runs
    before the rename (see ``SafetensorsWriter``). ``fits`` (given): a ``ScaleFit`` of each tensor
    whose scale came from a stats file, measured while it is quantized. ``rounder``: GPTQ codes
    for the tensors it has a Hessian for (``--rounding gptq``).
    """
    by_name = {t.name: t for t in plan.tensors}
    stored_as = _scale_dtypes(plan)
    buffers = _Buffers(plan)
    with SafetensorsWriter(path, [e.spec for e in emits], metadata, overwrite=overwrite) as writer:
        for emit in emits:
            if emit.role is Role.CONSTANT:
                writer.write(emit.payload)
            elif emit.role is Role.SCALE:
                writer.write(_scale_bytes(scales[emit.source], emit.spec.dtype))
            else:
                t = by_name[emit.source]
                fit = ScaleFit(plan.options.fp8) if fits is not None and t.name in plan.weight_ranges else None
                scale = _write_tensor(source, t, scales.get(t.name), plan.options, writer, buffers,
                                      stored_as.get(t.name), finite_check=t.name in plan.weight_ranges, fit=fit,
                                      rounder=rounder)
                if fit is not None:
                    fits[t.name] = fit
                if scale is not None:
                    scales[t.name] = scale
                progress.advance(t.info.nbytes)
        return writer.finish(before_publish)


def plan_summary(plan: Plan) -> dict:
    """The manifest's record of the conversion: the plan's summary, quantkit's version, the options
    as given (what ``quantkit publish`` rebuilds the exact convert command from) and every tensor's
    decision (``[name, action, kind, reason]``: the card's table is the plan, not a re-derivation)."""
    return {**plan.summary(), "quantkit_version": __version__, "options": options_record(plan.options),
            "decisions": [[t.name, t.action.value, t.decision.kind.value, t.decision.reason] for t in plan.tensors],
            **({"keep_choice": plan.keep_choice} if plan.keep_choice is not None else {})}


def options_record(o: ConvertOptions) -> dict:
    """The options as ``ConvertOptions.from_strings`` takes them (granularity and FP8 dtype as the
    plan resolved them): enough to rebuild the exact ``quantkit convert`` command, the user's
    --quantize/--keep rules apart from the preset's."""
    return {"granularity": o.granularity.value, "fp8": o.fp8.name, "format": o.format,
            "keep_dtype": o.keep_dtype.value, "preset": o.preset, "recipe": o.recipe.value,
            "rules": [[r.action.value, r.pattern] for r in o.policy.rules],
            "quantize_conv": o.policy.quantize_conv, "allow_nonfinite": o.allow_nonfinite,
            "comfy_header_metadata": o.comfy_header_metadata, "component": o.component, "ema": o.ema,
            "max_shard_bytes": o.max_shard_bytes, "rounding": o.rounding.value}


def _scale_bytes(scale: torch.Tensor, dtype) -> bytes:
    return scale.to(dtype.torch).reshape(-1).view(torch.uint8).numpy().tobytes()


class _Buffers:
    """Work buffers reused by every chunk of every tensor (fresh ones would page-fault each time)."""

    def __init__(self, plan: Plan):
        elems = max((_chunk_elems(t.info, plan.options) for t in plan.quantized()), default=0)
        self.work = torch.empty(elems, dtype=torch.float32)
        self.out = torch.empty(elems, dtype=plan.options.fp8.torch_dtype)


def _chunk_elems(info, options: ConvertOptions) -> int:
    if not info.shape or info.shape[0] == 0:
        return info.numel
    rows = chunk_rows(info, CHUNK_BYTES, fp8math.block_rows(options.granularity))
    return min(info.shape[0], rows) * (info.numel // info.shape[0])


def _write_tensor(source: SafetensorsFile, t: PlannedTensor, scale, options: ConvertOptions, writer,
                  buffers: _Buffers, scale_dtype=None, finite_check: bool = False, fit: ScaleFit | None = None,
                  rounder: GPTQRounder | None = None):
    """Write one tensor's output bytes. A quantized tensor without ``scale`` gets its scale chunk
    by chunk (rounded to ``scale_dtype``), which is returned; otherwise returns None.
    ``finite_check``: refuse NaN/Inf in a weight whose scale did not come from its absmax; ``fit``:
    measure how that scale fits the weight."""
    info = t.info
    if t.action is Action.QUANTIZE and t.prequantized is None:
        if rounder is not None and len(info.shape) != 2:
            rounder.nearest[info.name] = "not a linear weight"
        elif rounder is not None and (key := rounder.key(info.name)) is not None:
            done, fresh = _write_gptq(source, info, scale, options, writer, scale_dtype, fit, rounder, key)
            if done:
                return fresh
        return _write_quantized(source, info, scale, options, writer, buffers, scale_dtype, finite_check, fit)
    if info.nbytes == 0:
        return None
    if t.action is Action.KEEP and t.prequantized is not None:     # an FP8 source tensor the user keeps
        s = t.prequantized
        stored_scale = source.read_tensor(source.tensors[s.scale_key]).float()
        for r0, r1, q in source.iter_rows(info, CHUNK_BYTES, fp8math.block_rows(s.granularity)):
            w = fp8math.dequantize(q, fp8math.scale_rows(stored_scale, s.granularity, r0, r1), s.granularity,
                                   t.out_dtype.torch)
            writer.write(w.contiguous().reshape(-1).view(torch.uint8).numpy())
        return None
    if t.prequantized is not None or t.out_dtype == info.dtype:   # bytes as they are (FP8 codes carried over)
        _copy_bytes(source, info, writer)
        return None
    target = t.out_dtype.torch
    for _, _, x in source.iter_rows(info, CHUNK_BYTES):
        y = x.to(target)
        if not target.is_floating_point or torch.finfo(target).max < torch.finfo(x.dtype).max:
            _check_cast(x, y, info.name, source.path, t.out_dtype.code)
        writer.write(y.contiguous().reshape(-1).view(torch.uint8).numpy())
    return None


def _write_quantized(source: SafetensorsFile, info, scale, options: ConvertOptions, writer, buffers: _Buffers,
                     scale_dtype, finite_check: bool = False, fit: ScaleFit | None = None):
    g, fmt = options.granularity, options.fp8

    def scale_of(amax: torch.Tensor) -> torch.Tensor:
        fresh = fp8math.scale_from_absmax(amax, fmt)
        return fresh if scale_dtype is None else _stored(fresh, scale_dtype, source.path, info.name)

    parts = []
    for r0, r1, x in source.iter_rows(info, CHUNK_BYTES, fp8math.block_rows(g)):
        y = fp8math.widen(x, buffers.work)
        if scale is None:
            # The chunk holds whole rows (tile rows): its scales depend on it alone. Absmax of
            # the float32 copy: the same values as the source's, and faster to reduce.
            parts.append(scale_of(chunk_absmax(y, g, options.allow_nonfinite, source.path, info.name)[0]))
            chunk_scale = parts[-1]
        else:
            if finite_check and not options.allow_nonfinite and not bool(torch.isfinite(y).all()):
                chunk_absmax(y, g, False, source.path, info.name)       # raises NonFiniteError, counting them
            chunk_scale = fp8math.scale_rows(scale, g, r0, r1)
            if fit is not None:       # before quantizing divides y in place
                fit.update(y, chunk_scale, g)
        space = writer.reserve(y.numel())     # one byte a code: the codes go straight into the output's buffer
        out = buffers.out if space is None else torch.frombuffer(space, dtype=torch.uint8).view(fmt.torch_dtype)
        q = fp8math.quantize_widened(y, chunk_scale, g, fmt, out=out)
        if space is None:
            writer.write(q.reshape(-1).view(torch.uint8).numpy())
        else:
            writer.commit(len(space))
    if scale is not None:
        return None
    return torch.cat(parts, dim=0) if parts else scale_of(stack_absmax([], info.shape, g))


def _write_gptq(source: SafetensorsFile, info, scale, options: ConvertOptions, writer, scale_dtype,
                fit: ScaleFit | None, rounder: GPTQRounder, key: str) -> tuple[bool, torch.Tensor | None]:
    """GPTQ codes of one weight, read whole in float32 (GPTQ moves every column's error onto the
    columns after it): (written, its fresh scale if it had none). Not written (False): the rounder
    refused it (NaN/Inf, an unfactorable Hessian), and it goes the nearest way. The scale is fixed
    first, as nearest would make it (absmax / max per group, or the stats' range)."""
    g, fmt = options.granularity, options.fp8
    # A copy per chunk: the reader reuses its buffer for the next one.
    chunks = [x.to(torch.float32, copy=True) for _, _, x in source.iter_rows(info, CHUNK_BYTES, fp8math.block_rows(g))]
    w = torch.cat(chunks).reshape(info.shape) if chunks else torch.zeros(info.shape)
    del chunks
    fresh = None
    if scale is None:
        fresh = fp8math.scale_from_absmax(fp8math.absmax(w, g), fmt)
        fresh = fresh if scale_dtype is None else _stored(fresh, scale_dtype, source.path, info.name)
    codes = rounder.round(info.name, key, w, scale if scale is not None else fresh, g, fmt)
    if codes is None:
        return False, None
    if fit is not None:
        fit.update(w, scale, g)
    writer.write(codes.reshape(-1).view(torch.uint8).numpy())
    return True, fresh


def _copy_bytes(source, info, writer) -> None:
    """A tensor's bytes as they are, read straight into the output's buffers (no copy between)."""
    step = CHUNK_BYTES // info.dtype.itemsize * info.dtype.itemsize
    for b0 in range(0, info.nbytes, step):
        n = min(step, info.nbytes - b0)
        space = writer.reserve(n)
        source.read_into(info, b0, space)
        writer.commit(n)


def _check_cast(x: torch.Tensor, y: torch.Tensor, name: str, path: str, code: str) -> None:
    """A narrowing cast (fp32 -> fp16) must not turn finite values into Inf."""
    if bool(torch.isinf(y).any()) and not bool(torch.isinf(y).eq(torch.isinf(x)).all()):
        raise NonFiniteError(f"values exceed the {code} range", path=path, tensor=name,
                             hint="use --keep-dtype bf16 (or fp32/source)")
