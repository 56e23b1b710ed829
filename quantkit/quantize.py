"""Quantize stage: stream a checkpoint through the plan into an output format.

    header -> plan -> calibrate (absmax, while the source hashes on the other core)
           -> write header -> per tensor: quantize / cast / copy, chunk by chunk -> rename -> manifest

Memory is a few chunk buffers, whatever the checkpoint's size: no tensor is ever read whole.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from . import fp8 as fp8math
from ._version import __version__
from .calibration import collect_weight_stats
from .errors import NonFiniteError, OutputError
from .formats import Role, get_format
from .hashing import BackgroundHash
from .manifest import file_entry, write_manifest
from .plan import ConvertOptions, Plan, PlannedTensor, make_plan
from .policy import Action
from .progress import NULL, Progress
from .reader import SafetensorsFile, chunk_rows
from .writer import SafetensorsWriter, remove_stale_temps

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

    @property
    def gb_per_s(self) -> float:
        return self.bytes_in / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**self.__dict__, "gb_per_s": round(self.gb_per_s, 3)}


def check_destination(src: str, dst: str, overwrite: bool) -> None:
    """The destination may not be the source (also through links or '..'); an existing one needs overwrite."""
    if os.path.realpath(src) == os.path.realpath(dst) or (
            os.path.exists(dst) and os.path.samefile(src, dst)):
        raise OutputError("destination is the source file", path=dst, hint="choose another output path")
    if os.path.isdir(dst):
        raise OutputError("destination is a folder", path=dst, hint="give a file name ending in .safetensors")
    if os.path.exists(dst) and not overwrite:
        raise OutputError("destination exists", path=dst, hint="pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise OutputError("destination folder does not exist", path=parent, hint="create it first")


def convert(src: str, dst: str, options: ConvertOptions = ConvertOptions(), *, overwrite: bool = False,
            progress: Progress = NULL) -> ConvertResult:
    """Convert the safetensors file ``src`` into ``dst`` under ``options``; returns a summary.

    >>> convert("model.safetensors", "model-fp8.safetensors")     # doctest: +SKIP
    """
    t0 = time.perf_counter()
    check_destination(src, dst, overwrite)
    for path in remove_stale_temps(dst):
        progress.warn(f"removed a temporary file left by an interrupted run: {path}")
    with SafetensorsFile(src) as source, BackgroundHash(src) as source_hash:
        plan = make_plan(source, options)
        for w in plan.warnings:
            progress.warn(w)
        quantized = [t.info for t in plan.quantized()]
        progress.stage("calibrate", sum(i.nbytes for i in quantized))
        stats = collect_weight_stats(source, quantized, options.granularity, options.allow_nonfinite,
                                     progress=progress.advance)
        scales = {name: fp8math.scale_from_absmax(s.absmax, options.fp8) for name, s in stats.items()}

        # The header names the source's SHA256, so it waits for the hash (which ran on the
        # other core during calibration).
        source_sha = source_hash.result()
        fmt = get_format(options.format)
        metadata = {**{k: v for k, v in source.metadata.items() if not k.startswith("quantkit.")},
                    **fmt.metadata(plan, {"quantkit.source": os.path.basename(source.path),
                                          "quantkit.source_sha256": source_sha})}
        progress.stage("quantize", plan.bytes_in)
        by_name = {t.name: t for t in plan.tensors}
        with SafetensorsWriter(dst, [e.spec for e in plan.outputs], metadata, overwrite=overwrite) as writer:
            for emit in plan.outputs:
                if emit.role is Role.CONSTANT:
                    writer.write(emit.payload)
                elif emit.role is Role.SCALE:
                    writer.write(_scale_bytes(scales[emit.source], emit.spec.dtype))
                else:
                    t = by_name[emit.source]
                    _write_tensor(source, t, scales.get(t.name), options, writer)
                    progress.advance(t.info.nbytes)
            output_sha = writer.finish()
    progress.close()

    manifest = write_manifest(dst, files={os.path.basename(dst): file_entry(dst, output_sha)},
                              source={"name": os.path.basename(src), "sha256": source_sha,
                                      "bytes": os.path.getsize(src)},
                              conversion=plan_summary(plan))
    return ConvertResult(
        source=src, destination=dst, manifest=manifest, format=options.format,
        granularity=options.granularity.value,
        counts={a.value: plan.count(a) for a in Action}, bytes_in=os.path.getsize(src),
        bytes_out=os.path.getsize(dst), seconds=time.perf_counter() - t0,
        source_sha256=source_sha, output_sha256=output_sha, warnings=plan.warnings)


def plan_summary(plan: Plan) -> dict:
    o = plan.options
    return {"format": o.format, "fp8": o.fp8.name, "granularity": o.granularity.value,
            "keep_dtype": o.keep_dtype.value, "policy": o.policy.describe(),
            "counts": {a.value: plan.count(a) for a in Action}, "quantkit_version": __version__}


def _scale_bytes(scale: torch.Tensor, dtype) -> bytes:
    return scale.to(dtype.torch).reshape(-1).view(torch.uint8).numpy().tobytes()


def _write_tensor(source: SafetensorsFile, t: PlannedTensor, scale, options: ConvertOptions, writer) -> None:
    info = t.info
    if info.nbytes == 0:
        return
    if t.action is Action.QUANTIZE:
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
