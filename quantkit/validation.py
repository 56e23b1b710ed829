"""Validate stage: prove an output is intact and faithful to its source.

1. Integrity: the SHA256 of the output (and of the source, when the manifest names it) is
   recomputed and compared with the manifest written at conversion. One flipped byte fails.
2. Fidelity: every tensor is dequantized (W = q * scale) or read back and compared with the
   source, chunk by chunk: PSNR, SQNR, cosine and max abs error per tensor, then a summary.
3. Structure: every source tensor is present with its shape, and nothing else is.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

from . import fp8 as fp8math
from .destinations import check_report_path, output_paths, source_reads
from .dtypes import Kind
from .errors import FormatError, QuantkitError, UnsupportedInputError, ValidationFailed
from .formats import StoredTensor, detect_format
from .hashing import BackgroundHash, combined_digest, sha256_file, torch_threads
from .manifest import manifest_path, read_manifest
from .metrics import FLOOR_MARGIN_DB, ErrorStats, peak_to_rms_db, rtn_sqnr_bound
from .options import ValidateOptions
from .progress import NULL, Progress
from .readback import CHUNK_BYTES, load_dequantized, open_output, stored_values, stored_view  # noqa: F401
from .reader import SafetensorsFile, chunk_rows
from .sources import open_source
from .workers import cap_jobs, default_jobs, run_pieces



@dataclass
class TensorReport:
    name: str
    stored: str                    # "fp8", "float" (kept in high precision) or "bytes" (passed through)
    granularity: str | None
    psnr: float
    sqnr: float
    cosine: float
    max_abs_error: float
    nonfinite: int = 0             # NaN/Inf in the source (allowed with --allow-nonfinite)
    broken: int = 0                # finite in the source, NaN/Inf in the output: always a failure
    sqnr_floor: float | None = None   # FP8: the default sanity floor (sqnr_floor()), None for the others

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("psnr", "sqnr", "cosine", "max_abs_error", "sqnr_floor"):
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = None    # JSON has no Infinity: null means exact (error 0)
        d["exact"] = self.max_abs_error == 0 and not self.broken
        return d


@dataclass
class ValidationReport:
    output: str
    against: str | None
    format: str | None = None
    hashes: list[dict] = field(default_factory=list)
    tensors: list[TensorReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    min_sqnr: float | None = None
    seconds: float = 0.0
    model_output: dict | None = None      # --model-output: the model's output, source vs quantized
    jobs: int = 1                         # processes that compared and hashed
    workers_peak_rss_bytes: int = 0       # the sum of their peaks (jobs > 1)
    rounding: dict | None = None          # the manifest's record of --rounding gptq (None: nearest)

    @property
    def ok(self) -> bool:
        return not self.failures

    def floor(self) -> dict:
        """The per-tensor SQNR bar this report applied: the user's --min-sqnr, or the default floor."""
        if self.min_sqnr is not None:
            return {"rule": "min-sqnr", "db": self.min_sqnr, "what": f"every tensor's SQNR >= {self.min_sqnr:g} dB"}
        floors = [t.sqnr_floor for t in self.quantized() if t.sqnr_floor is not None]
        margin = FLOOR_MARGIN_DB + (GPTQ_MARGIN_DB if self.rounding else 0.0)
        gptq = f" (GPTQ rounding: {GPTQ_MARGIN_DB:g} dB more, see GPTQ_MARGIN_DB)" if self.rounding else ""
        return {"rule": "default", "db": min(floors) if floors else None, "margin_db": margin,
                "what": f"every FP8 tensor's SQNR within {margin:g} dB of the least that round-to-nearest "
                        f"with its scale groups' absmax gives its data{gptq} (--min-sqnr DB sets another bar)"}

    def quantized(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.stored == "fp8"]

    def lowest(self, count: int) -> list[tuple[str, float]]:
        """(name, SQNR) of the ``count`` compared tensors with the lowest SQNR, lowest first."""
        return [(t.name, t.sqnr) for t in sorted((t for t in self.tensors if t.stored != "bytes"),
                                                 key=lambda t: t.sqnr)[:count]]

    def summary(self) -> dict:
        q = self.quantized()
        def stat(attr):
            vals = [getattr(t, attr) for t in q]
            return {"min": min(vals), "median": statistics.median(vals)} if vals else None
        return {"tensors": len(self.tensors), "quantized": len(q), "sqnr_db": stat("sqnr"),
                "psnr_db": stat("psnr"), "cosine": stat("cosine"),
                "worst": self.lowest(5)}

    def to_dict(self) -> dict:
        summary = self.summary()
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v
        return clean({"ok": self.ok, "output": self.output, "against": self.against, "format": self.format,
                      "min_sqnr": self.min_sqnr, "sqnr_floor": self.floor(), "seconds": self.seconds,
                      "hashes": self.hashes,
                      "failures": self.failures, "notes": self.notes, "summary": summary,
                      "model_output": self.model_output, "jobs": self.jobs, "rounding": self.rounding,
                      "workers_peak_rss_bytes": self.workers_peak_rss_bytes,
                      "tensors": [t.to_dict() for t in self.tensors]})


def validate(output: str, against: str | None = None, options: ValidateOptions | None = None, *,
             progress: Progress = NULL, reports: dict[str, str] | None = None, overwrite_reports: bool = False,
             jobs: int | None = 1, **fields) -> ValidationReport:
    """Check ``output`` (a quantkit output: a file, a folder, a sharded folder) against its
    manifest and, with ``against``, its source (any layout ``open_source`` reads; the
    component and EMA choice recorded in the manifest apply unless given).

    Args:
        output: what ``convert`` wrote (its file, folder or sharded folder's index).
        against: the source checkpoint; None checks the hashes only.
        options: what to check (``ValidateOptions``: the SQNR bars, the model's outputs and
            their simulated W8A8 rows, compute dtype). Its fields may be given as keywords instead
            (``validate(out, src, min_sqnr=30)``), not both.
        progress: progress callbacks.
        reports: (option -> path) files the caller writes afterwards, checked before any work
            (never the output, its manifest or a file the source reads; ``overwrite_reports`` to
            replace one).
        jobs: processes sharing the per-tensor work and the SHA256s (each file hashed by one of
            them, the tensors compared in groups), for a balanced load on every core; None: as many
            as the cores and memory allow where that pays (3 cores or more, files of
            ``PARALLEL_MIN_BYTES`` or more), else 1 (this process, the hashes on threads beside the
            comparison). The report is the same whatever the number.

    Returns:
        A ``ValidationReport``. Never raises for a bad output: every problem becomes a line in
        ``report.failures``. Raises ``QuantkitError`` only for unusable arguments (a missing
        output, a missing or malformed source), ``ValueError`` for options that mean nothing.

    >>> report = validate("model-fp8.safetensors", "model.safetensors", ValidateOptions(min_sqnr=30))  # doctest: +SKIP
    """
    options = _options(options, fields)
    t0 = time.perf_counter()
    if not os.path.lexists(output):
        raise UnsupportedInputError("does not exist", path=output,
                                    hint="pass the file or folder quantkit convert wrote")
    given, output = output, _output_of(output)
    _check_is_safetensors(output)
    report = ValidationReport(output, against, min_sqnr=options.min_sqnr)
    if given != output:
        report.notes.append(f"{given} is the index of the sharded output {output}: the folder is validated")
    manifest = _manifest(output, options.check_hash, report)
    report.rounding = _rounding(output, manifest)
    src = _open_against(against, _recorded_source(output, manifest), options.component, options.ema) \
        if against else None
    run_model = options.runs_model and src is not None
    try:
        for option, path in (reports or {}).items():
            check_report_path(path, option, reads=[*output_paths(output), *(source_reads(src) if src else [])],
                              overwrite=overwrite_reports)
        if run_model:
            from .model_output import check_model_output
            check_model_output(src)        # before the per-tensor work, not after it
        report.jobs = _jobs(jobs, output, src, report)
        deferred = report.jobs > 1              # hashed by the workers: no thread may run when they fork
        start = _Deferred if deferred else (lambda paths: BackgroundHash(paths).start())
        hashes = _start_hashes(output, manifest, src, report, start) if manifest is not None else []
        _compare_output(output, src, report, progress,
                        [job for job in {id(h[3]): h[3] for h in hashes}.values()] if deferred else None)
        if run_model:
            _compare_model_output(src, output, report, options)
    finally:
        if src is not None:
            src.close()
    _check_hashes(hashes, _chain(output, manifest, report), src, report)
    if report.rounding:
        for t in report.quantized():
            if t.sqnr_floor is not None:
                t.sqnr_floor -= GPTQ_MARGIN_DB
    _quality_failures(report, options.min_sqnr)
    progress.close()
    report.seconds = time.perf_counter() - t0
    return report


def _output_of(path: str) -> str:
    """The output a path names: a sharded output's index (as ``convert`` accepts it for a source)
    stands for its folder, when quantkit wrote that folder (it holds its manifest)."""
    from .manifest import FOLDER_MANIFEST
    from .shards import is_index_name
    folder = os.path.dirname(path) or "."
    if os.path.isfile(path) and is_index_name(os.path.basename(path)) and \
            os.path.isfile(os.path.join(folder, FOLDER_MANIFEST)):
        return folder
    return path


def _check_is_safetensors(output: str) -> None:
    """Refuse an output file whose first bytes are not a safetensors header: it is not what its
    name says (bad input), unlike a damaged quantkit output, which fails validation."""
    from .checkpoint import sniff
    path = output if not os.path.isdir(output) else None
    if path is None:
        names = [n for n in os.listdir(output) if n.endswith(".safetensors")]
        path = os.path.join(output, names[0]) if len(names) == 1 else None
    if path is None or not os.path.isfile(path):
        return
    held = sniff(path)
    if held != "safetensors":
        what = {"pickle": "it holds a PyTorch pickle", "json": "it holds JSON text", "gguf": "it is a GGUF file"}.get(
            held, "it is empty" if os.path.getsize(path) == 0 else "its first bytes are no safetensors header")
        raise UnsupportedInputError(f"not a safetensors file ({what})", path=path,
                                    hint="pass the .safetensors file or folder quantkit convert wrote")


def _manifest(output: str, check_hash: bool, report: ValidationReport) -> dict | None:
    """The output's manifest, or None (hash check skipped, or the manifest is missing: a failure)."""
    if not check_hash:
        report.notes.append("hash check skipped")
        return None
    try:
        return read_manifest(output)
    except ValidationFailed as exc:
        report.failures.append(str(exc))
        return None


def _open_against(against: str, recorded: dict, component: str | None, ema: bool | None):
    """The source, opened as the manifest says the output was made (component, EMA, naming) unless given;
    for a conversion of a conversion, a source that is not FP8 is the chain's original, opened as the
    FP8 file's own conversion opened it."""
    def opened(record: dict):
        return open_source(against, component=component if component is not None else record.get("component"),
                           ema=ema if ema is not None else bool(record.get("ema")), names=record.get("names"))
    chain = recorded.get("made_from")
    if not isinstance(chain, dict):
        return opened(recorded)
    original = {**recorded, **{k: chain[k] for k in ("component", "ema", "names") if k in chain}}
    try:
        src = opened(recorded)
    except QuantkitError:            # (a pipeline folder, say, that only its component opens)
        return opened(original)
    if any(i.dtype.kind is Kind.FP8 for i in src.tensors.values()):
        return src                   # the FP8 file converted
    src.close()
    return opened(original)


# A validation this large (source and output) is shared between processes unless --jobs says otherwise:
# below it, forking workers costs more than it saves.
PARALLEL_MIN_BYTES = 1 << 30


def _jobs(jobs: int | None, output: str, src, report: ValidationReport) -> int:
    """The processes to run: ``jobs`` as asked, bounded by the cores and the free memory (a note
    says so when that caps it), or the default."""
    if jobs is not None:
        if not hasattr(os, "fork"):
            return 1
        jobs, note = cap_jobs(jobs)
        if note:
            report.notes.append(note)
        return jobs
    files = [os.path.join(output, n) for n in os.listdir(output)] if os.path.isdir(output) else [output]
    size = (src.file_size if src is not None else 0) + sum(os.path.getsize(p) for p in files if os.path.isfile(p))
    # On 2 cores the threads already keep both busy (the comparison, the hashes beside it), and
    # default_jobs() is 1 there: at 6 GB right after convert, 4 alternating pairs, one process
    # 12.6-14.2 s, two 12.9-15.2 s, at twice the memory (656 vs 290 MB).
    return default_jobs() if size >= PARALLEL_MIN_BYTES and hasattr(os, "fork") else 1


class _Deferred:
    """The SHA256s of ``paths``, computed by the worker processes (``BackgroundHash``'s interface)."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self.digests: dict[str, str] = {}

    def result(self) -> str:
        return combined_digest(self.digests)


def _compare_output(output: str, src, report: ValidationReport, progress: Progress,
                    hash_jobs: list[_Deferred] | None = None) -> None:
    """The per-tensor comparison, in this process, or (``hash_jobs`` given: ``report.jobs`` > 1)
    in worker processes that also compute those SHA256s."""
    try:
        out = open_output(output)
    except QuantkitError as exc:
        report.failures.append(f"cannot read the output: {exc}")
        if hash_jobs:                   # its files are still hashed (and checked against the manifest)
            _in_workers([], hash_jobs, None, None, report, progress)
        return
    with out, torch_threads(1):
        _compare(out, src, report, progress, hash_jobs)


def _options(options: ValidateOptions | None, fields: dict) -> ValidateOptions:
    """The options ``validate`` was given: a ``ValidateOptions``, or its fields as keywords (one place maps them)."""
    if options is not None and fields:
        raise TypeError(f"validate() takes options or their fields as keywords, not both ({', '.join(fields)})")
    return options if options is not None else ValidateOptions(**fields)


def _compare_model_output(src, output: str, report: ValidationReport, options: ValidateOptions) -> None:
    from .model_output import compare_model_output
    min_output_sqnr, min_w8a8_sqnr = options.min_output_sqnr, options.min_w8a8_sqnr
    try:
        report.model_output = compare_model_output(src, output, compute_dtype=options.compute_dtype.value,
                                                   activations=options.activations.value,
                                                   max_memory=options.max_memory)
    except ValidationFailed as exc:  # the source ran; the output did not (a tensor missing...)
        report.failures.append(f"model output: {exc}")
        return
    sqnr = report.model_output["sqnr"]
    if min_output_sqnr is not None and not sqnr >= min_output_sqnr:
        report.failures.append(f"model output: SQNR {sqnr:.2f} dB is below --min-output-sqnr {min_output_sqnr:g}")
    if options.heldout:
        from .heldout import heldout_fidelity
        report.model_output["heldout"] = heldout_fidelity(src, output, compute_dtype=options.compute_dtype.value,
                                                          max_memory=options.max_memory)
    file_row = next((r for r in report.model_output["rows"] if r["row"] == "file"), None)
    if min_w8a8_sqnr is not None and file_row is not None and not file_row["sqnr"] >= min_w8a8_sqnr:
        report.failures.append(f"model output, W8A8 as the file implies: SQNR {file_row['sqnr']:.2f} dB is below "
                               f"--min-w8a8-sqnr {min_w8a8_sqnr:g}")


def _chain(output: str, manifest: dict | None, report: ValidationReport) -> dict | None:
    """What the output's FP8 source was itself made from (a conversion of a conversion), noted."""
    recorded = _recorded_source(output, manifest)
    chain = recorded.get("made_from")
    if not (isinstance(chain, dict) and chain.get("sha256")):
        return None
    report.notes.append(f"made from an FP8 conversion ({recorded.get('name')}) of {chain.get('name')} "
                        f"(sha256 {chain['sha256'][:16]}...)")
    return chain


def _check_hashes(hashes: list, chain: dict | None, src, report: ValidationReport) -> None:
    for label, path, expected, job, key in hashes:
        combined = job.result()
        actual = combined if key is None else job.digests[key]
        ok = actual == expected
        if not ok and label == "source" and chain and combined == chain["sha256"]:
            # --against names the original of the chain, not the FP8 file converted: check it as such
            label, path, expected, actual, ok = "original", src.path, chain["sha256"], combined, True
            if any(h["role"] == "original" for h in report.hashes):
                continue
        report.hashes.append({"file": path, "role": label, "expected": expected, "actual": actual, "ok": ok})
        if not ok:
            report.failures.append(f"{path}: sha256 mismatch with the manifest ({label} was modified or corrupted: "
                                   f"expected {expected[:16]}..., got {actual[:16]}...)")


def _quality_failures(report: ValidationReport, min_sqnr: float | None) -> None:
    for t in report.tensors:
        if t.broken:
            report.failures.append(f"{t.name}: {t.broken} finite source value(s) became NaN/Inf in the output")
    if min_sqnr is not None:            # the user's bar replaces the default floor
        for t in report.tensors:
            if t.stored != "bytes" and t.sqnr < min_sqnr:
                report.failures.append(f"{t.name}: SQNR {t.sqnr:.2f} dB is below --min-sqnr {min_sqnr:g}")
        return
    for t in report.quantized():
        if t.sqnr_floor is not None and not t.broken and not t.sqnr >= t.sqnr_floor:
            report.failures.append(floor_failure(t.name, t.sqnr, t.cosine, t.sqnr_floor))


# GPTQ moves weights off their nearest codes on purpose (each column's error is cancelled on the
# layer's output by the columns after it), so per-tensor weight SQNR drops while the output improves:
# measured 7.6 dB below round-to-nearest's at worst (MiniLM, 8 calibrations: 24.0 vs 31.6 dB), which
# left 2.9 dB above the default floor. Its floor sits this much lower (E4M3: ~15 dB), leaving GPTQ
# about the headroom nearest has (~9-10 dB); a zeroed or badly clipped tensor still falls below it.
GPTQ_MARGIN_DB = 6.0


def sqnr_floor(peak_to_rms: float, fmt: fp8math.FP8Format) -> float:
    """The default sanity floor of an FP8 tensor (dB): ``FLOOR_MARGIN_DB`` below the least SQNR
    round-to-nearest with its scale groups' absmax gives a tensor of that peak-to-RMS ratio (about
    21 dB in E4M3, 15 in E5M2, on any real weight)."""
    return rtn_sqnr_bound(peak_to_rms, fmt) - FLOOR_MARGIN_DB


def floor_failure(name: str, sqnr: float, cosine: float, floor: float) -> str:
    """The failure line of a tensor below its default floor: what is wrong and what to do."""
    return (f"{name}: SQNR {sqnr:.2f} dB (cosine {cosine:.4f}) is below its sanity floor of {floor:.1f} dB "
            f"(what FP8 round-to-nearest with its own absmax scale gives, less {FLOOR_MARGIN_DB:g} dB): its scale "
            f"clips or zeroes the weights: recompute the stats (quantkit calibrate) or convert without --stats; "
            f"--min-sqnr DB sets your own bar")


def _rounding(output: str, manifest: dict | None) -> dict | None:
    """The manifest's record of GPTQ rounding (``conversion.rounding``), or None (nearest)."""
    if manifest is None:
        try:
            manifest = read_manifest(output)
        except QuantkitError:
            return None
    record = manifest.get("conversion", {}).get("rounding") if isinstance(manifest, dict) else None
    return record if isinstance(record, dict) and record.get("method") == "gptq" else None


def _recorded_source(output: str, manifest: dict | None) -> dict:
    """The manifest's source record (also read when hashes are not checked: it says which
    component / EMA copy the output was made from)."""
    if manifest is None:
        try:
            manifest = read_manifest(output)
        except ValidationFailed:
            return {}
    source = manifest.get("source")
    return source if isinstance(source, dict) else {}


def _start_hashes(output, manifest: dict, src, report, start):
    """Checks ``(role, path, expected sha256, job, key)``: ``job`` (``start(paths)``) hashes the
    files of one role (a ``BackgroundHash``: in turn on one thread, no more hash threads than roles,
    whatever the number of files); ``key`` is the path whose digest is compared, None for the
    job's combined digest."""
    checks = []
    folder = os.path.isdir(output)
    expected = manifest["files"] if folder else {os.path.basename(output): manifest["files"].get(os.path.basename(output))}
    listed = []
    for name, entry in expected.items():
        path = os.path.join(output, name) if folder else output
        if not isinstance(entry, dict) or "sha256" not in entry:
            report.failures.append(f"{manifest_path(output)}: the manifest does not list {name}")
        elif not os.path.isfile(path):
            report.failures.append(f"{path}: listed in the manifest but missing")
        else:
            listed.append((path, entry["sha256"]))
    if listed:
        job = start([path for path, _ in listed])
        checks += [("output", path, sha, job, path) for path, sha in listed]
    source = manifest.get("source")
    if src is not None and isinstance(source, dict) and source.get("sha256"):
        recorded = {f.get("name"): f.get("sha256") for f in source.get("files") or [] if isinstance(f, dict)}
        by_name = {os.path.basename(f): f for f in src.files}
        job = start(src.files)
        if len(recorded) == len(src.files) and all(os.path.basename(n or "") in by_name for n in recorded):
            for name, sha in recorded.items():      # file by file: a mismatch names the file
                path = by_name[os.path.basename(name)]
                checks.append(("source", path, sha, job, path))
        else:
            checks.append(("source", src.path, source["sha256"], job, None))
    elif isinstance(source, dict) and source.get("sha256"):
        report.notes.append("source hash recorded but no --against given: source not verified")
    return checks


def _compare(out: SafetensorsFile, src: SafetensorsFile | None, report: ValidationReport, progress: Progress,
             hash_jobs: list[_Deferred] | None = None):
    pairs = _pairs(out, src, report) or []
    if hash_jobs is not None:
        results = _in_workers(pairs, hash_jobs, out, src, report, progress)
    else:
        if pairs:
            progress.stage("validate", src.file_size)
        results = []
        for item in pairs:
            results.append(item if isinstance(item, str) else _compare_one(out, src, *item))
            if not isinstance(item, str):
                progress.advance(src.tensors[item[1].data_key].nbytes)
    for result in results:          # in report order, whichever process computed them
        (report.tensors if isinstance(result, TensorReport) else report.failures).append(result)


def _pairs(out, src, report: ValidationReport) -> list | None:
    """What the comparison does, in report order: ``(output's StoredTensor, source's)`` pairs to
    compare, and the structural failures (missing, extra, reshaped tensors) as strings; None when
    the output's format cannot be read or there is no source (noted in ``report``)."""
    try:
        fmt = detect_format(out)
    except QuantkitError as exc:
        report.failures.append(str(exc))
        return None
    report.format = fmt.name
    try:
        stored = fmt.stored(out)
    except FormatError as exc:
        report.failures.append(str(exc))
        return None
    if src is None:
        report.notes.append("no --against source: integrity and structure checked, fidelity not measured")
        return None
    recorded = out.metadata.get("quantkit.source_sha256")
    if recorded:
        report.notes.append(f"output records source sha256 {recorded[:16]}...")
    source_view = stored_view(src)
    items: list = []
    for name, si in source_view.items():
        info = src.tensors[si.data_key]
        s = stored.get(name)
        if s is None:
            items.append(f"{name}: in the source but missing from the output")
            continue
        data = out.tensors[s.data_key]
        if tuple(data.shape) != tuple(info.shape):
            items.append(f"{name}: shape {list(data.shape)} in the output, {list(info.shape)} in the source")
            continue
        items.append((s, si))
    items += [f"{key}: in the output but not in the source" for key in stored.keys() - source_view.keys()]
    return items


def _compare_one(out, src, s: StoredTensor, si: StoredTensor) -> "TensorReport | str":
    try:
        return _compare_tensor(out, src, s, si)
    except QuantkitError as exc:
        return str(exc)


def _in_workers(pairs: list, hash_jobs: list[_Deferred], out, src, report: ValidationReport,
                progress: Progress) -> list:
    """``_compare``'s work and the deferred SHA256s as pieces for ``report.jobs`` forked processes:
    each file hashed by one, the tensors compared in groups of consecutive ones (about a quarter
    of a job's share each, so the pieces even out), the longest pieces first. Returns one result
    per item of ``pairs``, in its order (its failure strings as they are)."""
    todo = [i for i, item in enumerate(pairs) if not isinstance(item, str)]
    nbytes = {i: src.tensors[pairs[i][1].data_key].nbytes for i in todo}
    target = max(1, sum(nbytes.values()) // (4 * report.jobs))
    groups, group, size = [], [], 0
    for i in todo:
        group.append(i)
        size += nbytes[i]
        if size >= target:
            groups.append(group)
            group, size = [], 0
    if group:
        groups.append(group)
    # A tensor compared costs ~2x the CPU of hashing as many source bytes (validate: compare 4-7 CPU-s
    # for 6 GB against ~3.6 s of hashlib): the weights put the longest pieces first.
    cost = {("hash", p): os.path.getsize(p) for job in hash_jobs for p in job.paths}
    cost.update({("compare", g): 2 * sum(nbytes[i] for i in groups[g]) for g in range(len(groups))})
    pieces = sorted(cost, key=cost.get, reverse=True)

    def work(piece):
        kind, key = piece
        if kind == "hash":
            return sha256_file(key)
        return [_compare_one(out, src, *pairs[i]) for i in groups[key]]

    done = {}
    if pieces:
        progress.stage("validate", sum(cost.values()))
        report.jobs = min(report.jobs, len(pieces))          # no worker forked to sit idle
        results, report.workers_peak_rss_bytes = run_pieces(work, pieces, report.jobs,
                                                            lambda i, _: progress.advance(cost[pieces[i]]))
        done = dict(zip(pieces, results))
    for job in hash_jobs:
        job.digests = {p: done[("hash", p)] for p in job.paths}
    compared = {i: r for g, members in enumerate(groups) for i, r in zip(members, done[("compare", g)])}
    return [item if isinstance(item, str) else compared[i] for i, item in enumerate(pairs)]


def _same_bytes(x, y) -> bool:
    import numpy as np
    import torch
    return np.array_equal(x.reshape(-1).view(torch.uint8).numpy(), y.reshape(-1).view(torch.uint8).numpy())


def _float32(v, work):
    """``v`` as float32 (into ``work`` unless it already is)."""
    import torch
    return v if v.dtype is torch.float32 else fp8math.widen(v, work)


def _compare_tensor(out: SafetensorsFile, src: SafetensorsFile, s: StoredTensor, si: StoredTensor) -> TensorReport:
    import torch
    info, data = src.tensors[si.data_key], out.tensors[s.data_key]
    align = max(fp8math.block_rows(s.granularity) if s.scale_key else 1,
                fp8math.block_rows(si.granularity) if si.scale_key else 1)
    widest = info if info.nbytes >= data.nbytes else data
    per_chunk = chunk_rows(widest, CHUNK_BYTES, align)     # the same rows from both files
    rows = info.shape[0] if info.shape else 1
    elems = min(rows, per_chunk) * (info.numel // rows if rows else 0)
    # float32 values of one chunk per side, reused chunk after chunk (fresh ones page-fault)
    work_x, work_y = torch.empty(elems, dtype=torch.float32), torch.empty(elems, dtype=torch.float32)
    pairs = zip(stored_values(src, si, per_chunk, work_x), stored_values(out, s, per_chunk, work_y))
    if not info.dtype.torch.is_floating_point:
        for (_, _, x), (_, _, y) in pairs:
            if x.dtype != y.dtype or not bool((x == y).all()):
                raise ValidationFailed("bytes differ from the source (non-float tensors must pass untouched)",
                                       path=out.path, tensor=si.source_key, hint="re-run quantkit convert")
        return TensorReport(si.source_key, "bytes", None, math.inf, math.inf, 1.0, 0.0)
    stats = ErrorStats()
    as_stored = s.scale_key is None and si.scale_key is None and data.dtype == info.dtype
    for (_, _, x), (_, _, y) in pairs:
        if as_stored and _same_bytes(x, y):         # a kept tensor, copied bit for bit
            stats.update_exact(_float32(x, work_x))
        else:
            stats.update(_float32(x, work_x), _float32(y, work_y))
    if s.scale_key is not None:
        fmt = s.fp8 or fp8math.FP8_FORMATS.get(data.dtype.torch_name, fp8math.E4M3FN)
        return _report(si.source_key, "fp8", s.granularity.value, stats,
                       sqnr_floor(peak_to_rms_db(stats.n, stats.sum_x2, stats.peak), fmt) if stats.n else None)
    return _report(si.source_key, "float", None, stats)


def _report(name, stored, granularity, stats: ErrorStats, floor: float | None = None) -> TensorReport:
    return TensorReport(name, stored, granularity, stats.psnr, stats.sqnr, stats.cosine, stats.max_abs_error,
                        stats.nonfinite, stats.broken, floor)
