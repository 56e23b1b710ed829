"""Weight calibration: absmax per tensor / channel / 128x128 block, streamed from a checkpoint.

The result is plain data (``WeightStats``) that the quantizer turns into scales. Tensors are
read a chunk of rows at a time, so memory stays at one chunk whatever the tensor's size;
chunks of a block-granular weight hold whole 128-row tile rows, so per-chunk tile maxima
simply stack.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import NonFiniteError
from quantkit.fp8 import Granularity, absmax, block_rows, scale_shape
from quantkit.reader import SafetensorsFile, TensorInfo

CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class WeightStats:
    name: str
    granularity: Granularity
    absmax: torch.Tensor      # float32, shaped like the scale (see quantkit.fp8.scale_shape)
    nonfinite: int = 0        # NaN/Inf elements seen (non-zero only when allowed)


def weight_stats(file: SafetensorsFile, info: TensorInfo, granularity: Granularity,
                 allow_nonfinite: bool = False, chunk_bytes: int = CHUNK_BYTES) -> WeightStats:
    """Absmax of one weight. NaN/Inf raise ``NonFiniteError`` unless ``allow_nonfinite``,
    in which case they are counted and left out of the absmax (they quantize to NaN / ±max)."""
    parts, nonfinite = [], 0
    for _, _, x in file.iter_rows(info, chunk_bytes, block_rows(granularity)):
        amax, bad = chunk_absmax(x, granularity, allow_nonfinite, file.path, info.name)
        parts.append(amax)
        nonfinite += bad
    return WeightStats(info.name, granularity, stack_absmax(parts, info.shape, granularity), nonfinite)


def chunk_absmax(x: torch.Tensor, granularity: Granularity, allow_nonfinite: bool, path: str,
                 name: str) -> tuple[torch.Tensor, int]:
    """(absmax, NaN/Inf count) of a chunk of whole rows (whole 128-row tile rows per block) of
    the weight ``name``; see ``weight_stats``."""
    amax = absmax(x, granularity)
    if bool(torch.isfinite(amax).all()):
        return amax, 0
    bad = int((~torch.isfinite(x)).sum())
    if not allow_nonfinite:
        raise NonFiniteError(f"{bad} NaN/Inf value(s) in a tensor to be quantized", path=path, tensor=name,
                             hint="fix the checkpoint, keep the tensor with --keep, or pass --allow-nonfinite")
    return absmax(torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype)), granularity), bad


def stack_absmax(parts: list[torch.Tensor], shape: tuple[int, ...], granularity: Granularity) -> torch.Tensor:
    """A weight's absmax from its chunks' absmax, in chunk order."""
    if not parts:
        return torch.zeros(scale_shape(shape, granularity), dtype=torch.float32)
    if granularity is Granularity.TENSOR:
        return torch.stack(parts).amax()
    return torch.cat(parts, dim=0)


def collect_weight_stats(file: SafetensorsFile, infos: list[TensorInfo], granularity: Granularity,
                         allow_nonfinite: bool = False, progress=None) -> dict[str, WeightStats]:
    """``weight_stats`` for every tensor in ``infos``, in file order. ``progress(nbytes)`` after each."""
    stats = {}
    for info in sorted(infos, key=lambda t: t.start):
        stats[info.name] = weight_stats(file, info, granularity, allow_nonfinite)
        if progress is not None:
            progress(info.nbytes)
    return stats
