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
from quantkit.fp8 import Granularity, absmax, block_rows
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
        amax = absmax(x, granularity)
        if not bool(torch.isfinite(amax).all()):
            bad = int((~torch.isfinite(x)).sum())
            if not allow_nonfinite:
                raise NonFiniteError(f"{bad} NaN/Inf value(s) in a tensor to be quantized", path=file.path,
                                     tensor=info.name,
                                     hint="fix the checkpoint, keep the tensor with --keep, or pass --allow-nonfinite")
            nonfinite += bad
            amax = absmax(torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype)), granularity)
        parts.append(amax)
    if not parts:
        from quantkit.fp8 import scale_shape
        total = torch.zeros(scale_shape(info.shape, granularity), dtype=torch.float32)
    elif granularity is Granularity.TENSOR:
        total = torch.stack(parts).amax()
    else:
        total = torch.cat(parts, dim=0)
    return WeightStats(info.name, granularity, total, nonfinite)


def collect_weight_stats(file: SafetensorsFile, infos: list[TensorInfo], granularity: Granularity,
                         allow_nonfinite: bool = False, progress=None) -> dict[str, WeightStats]:
    """``weight_stats`` for every tensor in ``infos``, in file order. ``progress(nbytes)`` after each."""
    stats = {}
    for info in sorted(infos, key=lambda t: t.start):
        stats[info.name] = weight_stats(file, info, granularity, allow_nonfinite)
        if progress is not None:
            progress(info.nbytes)
    return stats
