"""Read-back: an output (or an FP8 source) as the values its source held, for validation and
for running the model.

Every format says how it stores each source tensor (``OutputFormat.stored``); this module opens
an output in any layout quantkit writes and reads those tensors back, dequantized (W = q * scale)
chunk by chunk or whole.
"""
from __future__ import annotations

import os

from . import fp8 as fp8math
from .checkpoint import open_checkpoint
from .dtypes import Kind
from .errors import ValidationFailed
from .formats import StoredTensor, detect_format
from .reader import SafetensorsFile, TensorSource
from .shards import is_index_name

# Per chunk of the wider of two tensors compared: float32 copies and temporaries stay a few
# MiB (and in cache), whatever the tensor.
CHUNK_BYTES = 2 << 20


def load_dequantized(path: str, dtype=None) -> dict:
    """Every tensor of a quantized file as its source would hold it: FP8 weights dequantized
    (W = q * scale, float32 or ``dtype``), kept tensors as stored, scales and markers dropped.

    Loads the whole state dict: meant for checking a model's output, not for big conversions.

    >>> model.load_state_dict(load_dequantized("model-fp8.safetensors"))   # doctest: +SKIP
    """
    import torch
    with open_output(path) as f:
        stored = detect_format(f).stored(f)
        out = {}
        for name, s in stored.items():
            t = f.read_tensor(f.tensors[s.data_key]).clone()
            if s.scale_key is not None:
                t = fp8math.dequantize(t, f.read_tensor(f.tensors[s.scale_key]), s.granularity,
                                       dtype or torch.float32)
            elif dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[name] = t
    return out


def open_output(output: str) -> TensorSource:
    """An output's weights as one source: the file itself, the one .safetensors file of a
    folder output, or the shards of a sharded output (through its index)."""
    if not os.path.isdir(output):
        return SafetensorsFile(output)
    indexes = sorted(n for n in os.listdir(output) if is_index_name(n))
    if len(indexes) == 1:
        return open_checkpoint(os.path.join(output, indexes[0]), ema=None)
    return SafetensorsFile(weights_file(output))


def weights_file(output: str) -> str:
    """The safetensors file of an output: the file itself, or the one inside a folder output."""
    if not os.path.isdir(output):
        return output
    names = sorted(n for n in os.listdir(output) if n.endswith(".safetensors"))
    if len(names) != 1:
        raise ValidationFailed(f"expected one .safetensors file (or a shard index) in the folder, found "
                               f"{len(names)}", path=output, hint="validate the folder quantkit convert wrote")
    return os.path.join(output, names[0])


def stored_view(src: TensorSource) -> dict[str, StoredTensor]:
    """How to read a source's values: as stored, or dequantized if it is an FP8 checkpoint."""
    if any(i.dtype.kind is Kind.FP8 for i in src.tensors.values()):
        return detect_format(src).stored(src)
    return {name: StoredTensor(name, name) for name in src.tensors}


def stored_values(file: TensorSource, s: StoredTensor, per_chunk: int, work):
    """(row_start, row_end, values) of a stored tensor: dequantized into ``work`` (float32, one
    chunk) when it has a scale, else as stored (a view of the reader's buffer)."""
    info = file.tensors[s.data_key]
    if s.scale_key is None:
        yield from file.iter_rows(info, CHUNK_BYTES, rows_per_chunk=per_chunk)
        return
    scale = file.read_tensor(file.tensors[s.scale_key]).float()
    for r0, r1, q in file.iter_rows(info, CHUNK_BYTES, rows_per_chunk=per_chunk):
        yield r0, r1, fp8math.dequantize(q, fp8math.scale_rows(scale, s.granularity, r0, r1), s.granularity,
                                         out=work)


def input_scale(file: TensorSource, s: StoredTensor) -> float | None:
    """The static activation scale stored beside a quantized tensor (``s.input_scale_key``: F32 []
    in native and the comfy formats, [1] in the model's dtype in compressed-tensors), or None.

    >>> with open_output("model-fp8.safetensors") as f:                  # doctest: +SKIP
    ...     scales = {n: input_scale(f, s) for n, s in detect_format(f).stored(f).items()}
    """
    if s.input_scale_key is None:
        return None
    return float(file.read_tensor(file.tensors[s.input_scale_key]).float().reshape(-1)[0])
