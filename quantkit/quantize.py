"""Quantize stage: stream a checkpoint through the plan into an output format.

    header -> plan -> calibrate (absmax, while the source hashes on the other core)
           -> write header -> per tensor: quantize / cast / copy, chunk by chunk -> rename -> manifest

Memory is a few chunk buffers, whatever the checkpoint's size: no tensor is ever read whole.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch

from . import fp8 as fp8math
from ._version import __version__
from .calibration import collect_weight_stats
from .errors import NonFiniteError, OutputError, UnsupportedInputError
from .formats import Role, get_format
from .hashing import BackgroundHash, sha256_file
from .manifest import file_entry, manifest_path, write_manifest
from .plan import ConvertOptions, Plan, PlannedTensor, make_plan
from .policy import Action
from .progress import NULL, Progress
from .reader import SafetensorsFile, chunk_rows
from .writer import SafetensorsWriter, TempFolder, remove_stale_temps

# Source bytes per chunk: small enough that the float32 work buffer stays in cache, large
# enough that per-call overhead vanishes (2 MiB measured fastest on a 2-core EPYC).
CHUNK_BYTES = 2 << 20


@dataclass
class ConvertResult:
    source: str
    destination: str
    manifest: str
    format: str
    granularity: str
    counts: dict[str, int]
    bytes_in: int
    bytes_out: int
    seconds: float
    source_sha256: str
    output_sha256: str
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_in / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**self.__dict__, "gb_per_s": round(self.gb_per_s, 3)}


def check_destination(src: str, dst: str, overwrite: bool, folder: bool = False) -> None:
    """The destination may not be the source (also through links or '..'); an existing one needs overwrite."""
    if os.path.realpath(src) == os.path.realpath(dst) or (
            os.path.exists(dst) and os.path.samefile(src, dst)):
        raise OutputError("destination is the source file", path=dst, hint="choose another output path")
    if folder and os.path.realpath(os.path.dirname(os.path.abspath(src))) == os.path.realpath(dst):
        raise OutputError("destination is the source's folder", path=dst, hint="choose a new folder")
    if not folder and os.path.isdir(dst):
        raise OutputError("destination is a folder", path=dst, hint="give a file name ending in .safetensors")
    if folder and os.path.exists(dst) and not os.path.isdir(dst):
        raise OutputError("destination is a file but this format writes a folder", path=dst,
                          hint="give a folder name")
    if os.path.exists(dst) and not overwrite:
        raise OutputError("destination exists", path=dst, hint="pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise OutputError("destination folder does not exist", path=parent, hint="create it first")


def convert(src: str, dst: str, options: ConvertOptions = ConvertOptions(), *, overwrite: bool = False,
            progress: Progress = NULL) -> ConvertResult:
    """Convert the safetensors file ``src`` into ``dst`` under ``options``; returns a summary.

    ``dst`` is a file, or a folder for folder formats (compressed-tensors).

    >>> convert("model.safetensors", "model-fp8.safetensors")     # doctest: +SKIP
    """
    t0 = time.perf_counter()
    fmt = get_format(options.format)
    check_destination(src, dst, overwrite, fmt.folder)
    for path in remove_stale_temps(dst):
        progress.warn(f"removed a temporary file left by an interrupted run: {path}")
    with SafetensorsFile(src) as source, BackgroundHash(src) as source_hash:
        plan = make_plan(source, options)
        for w in plan.warnings:
            progress.warn(w)
        scales = _calibrate(source, plan, progress)

        # The header names the source's SHA256, so it waits for the hash (which ran on the
        # other core during calibration).
        source_sha = source_hash.result()
        metadata = {**{k: v for k, v in source.metadata.items() if not k.startswith("quantkit.")},
                    **fmt.metadata(plan, {"quantkit.source": os.path.basename(source.path),
                                          "quantkit.source_sha256": source_sha})}
        with (TempFolder(dst) if fmt.folder else contextlib.nullcontext()) as folder:
            weights = os.path.join(folder.path, fmt.weights_name) if folder else dst
            output_sha = _write(source, plan, scales, weights, metadata, overwrite, progress)
            files = {os.path.basename(weights): file_entry(weights, output_sha)}
            if folder:
                for name in fmt.finalize(folder.path, plan, src):
                    path = os.path.join(folder.path, name)
                    files[name] = file_entry(path, sha256_file(path))
            manifest = write_manifest(folder.path if folder else dst, files=files,
                                      source={"name": os.path.basename(src), "sha256": source_sha,
                                              "bytes": os.path.getsize(src)},
                                      conversion=plan_summary(plan))
            if folder:
                folder.commit()
                manifest = manifest_path(dst)
    progress.close()
    return ConvertResult(
        source=src, destination=dst, manifest=manifest, format=options.format,
        granularity=options.granularity.value,
        counts={a.value: plan.count(a) for a in Action}, bytes_in=os.path.getsize(src),
        bytes_out=sum(f["bytes"] for f in files.values()), seconds=time.perf_counter() - t0,
        source_sha256=source_sha, output_sha256=output_sha, warnings=plan.warnings, notes=plan.notes)


def _calibrate(source: SafetensorsFile, plan: Plan, progress: Progress) -> dict:
    """Scales of every quantized tensor: from weight absmax, or carried over from an FP8 source,
    then rounded to the dtype the format stores them in (quantization uses the stored value,
    so W = q * scale holds exactly for what is on disk)."""
    options = plan.options
    fresh = [t.info for t in plan.quantized() if t.prequantized is None]
    progress.stage("calibrate", sum(i.nbytes for i in fresh))
    stats = collect_weight_stats(source, fresh, options.granularity, options.allow_nonfinite,
                                 progress=progress.advance)
    scales = {name: fp8math.scale_from_absmax(s.absmax, options.fp8) for name, s in stats.items()}
    for t in plan.quantized():
        if t.prequantized is not None:
            scales[t.name] = source.read_tensor(source.tensors[t.prequantized.scale_key]).float()
    for emit in plan.outputs:
        if emit.role is Role.SCALE:
            stored = scales[emit.source].to(emit.spec.dtype.torch)
            if not bool(torch.isfinite(stored).all()) or bool((stored == 0).any()):
                raise UnsupportedInputError(f"a scale does not fit in {emit.spec.dtype.code}", path=source.path,
                                            tensor=emit.source, hint="this format stores scales in the model's dtype;"
                                                                     " keep this tensor with --keep")
            scales[emit.source] = stored.float().reshape(scales[emit.source].shape)
    return scales


def _write(source, plan: Plan, scales: dict, path: str, metadata: dict, overwrite: bool, progress) -> str:
    """Stream every output tensor of ``plan`` into the safetensors file ``path``; returns its SHA256."""
    progress.stage("quantize", plan.bytes_in)
    by_name = {t.name: t for t in plan.tensors}
    with SafetensorsWriter(path, [e.spec for e in plan.outputs], metadata, overwrite=overwrite) as writer:
        for emit in plan.outputs:
            if emit.role is Role.CONSTANT:
                writer.write(emit.payload)
            elif emit.role is Role.SCALE:
                writer.write(_scale_bytes(scales[emit.source], emit.spec.dtype))
            else:
                t = by_name[emit.source]
                _write_tensor(source, t, scales.get(t.name), plan.options, writer)
                progress.advance(t.info.nbytes)
        return writer.finish()


def plan_summary(plan: Plan) -> dict:
    o = plan.options
    return {"format": o.format, "fp8": o.fp8.name, "granularity": o.granularity.value,
            "keep_dtype": o.keep_dtype.value, "policy": (plan.policy or o.policy).describe(), "notes": plan.notes,
            "counts": {a.value: plan.count(a) for a in Action}, "quantkit_version": __version__}


def _scale_bytes(scale: torch.Tensor, dtype) -> bytes:
    return scale.to(dtype.torch).reshape(-1).view(torch.uint8).numpy().tobytes()


def _write_tensor(source: SafetensorsFile, t: PlannedTensor, scale, options: ConvertOptions, writer) -> None:
    info = t.info
    if info.nbytes == 0:
        return
    if t.prequantized is not None:                     # FP8 codes carried over byte for byte
        for piece in source.iter_bytes(info, CHUNK_BYTES):
            writer.write(piece)
    elif t.action is Action.QUANTIZE:
        g = options.granularity
        align = fp8math.block_rows(g)
        rows = chunk_rows(info, CHUNK_BYTES, align)
        elems = min(info.shape[0], rows) * (info.numel // info.shape[0])
        work = torch.empty(elems, dtype=torch.float32)        # reused by every chunk
        out = torch.empty(elems, dtype=options.fp8.torch_dtype)
        for r0, r1, x in source.iter_rows(info, CHUNK_BYTES, align):
            q = fp8math.quantize(x, fp8math.scale_rows(scale, g, r0, r1), g, options.fp8, out=out, work=work)
            writer.write(q.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif t.out_dtype == info.dtype:
        for piece in source.iter_bytes(info, CHUNK_BYTES):
            writer.write(piece)
    else:
        target = t.out_dtype.torch
        for _, _, x in source.iter_rows(info, CHUNK_BYTES):
            y = x.to(target)
            if not target.is_floating_point or torch.finfo(target).max < torch.finfo(x.dtype).max:
                _check_cast(x, y, info.name, source.path, t.out_dtype.code)
            writer.write(y.contiguous().view(torch.uint8).numpy().tobytes())


def _check_cast(x: torch.Tensor, y: torch.Tensor, name: str, path: str, code: str) -> None:
    """A narrowing cast (fp32 -> fp16) must not turn finite values into Inf."""
    if bool(torch.isinf(y).any()) and not bool(torch.isinf(y).eq(torch.isinf(x)).all()):
        raise NonFiniteError(f"values exceed the {code} range", path=path, tensor=name,
                             hint="use --keep-dtype bf16 (or fp32/source)")
