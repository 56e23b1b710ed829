"""The dtype tables: safetensors header string <-> torch dtype, item size, kind; the FP8
encodings and the scale granularities.

Only dtypes listed here are accepted in a header; anything else is refused by name.
Kept free of a torch import so that header parsing, planning and the CLI's ``--help`` stay cheap.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    FLOAT = "float"   # a candidate for quantization or a cast to the keep dtype
    FP8 = "fp8"       # already quantized
    INT = "int"       # passes through untouched
    BOOL = "bool"


@dataclass(frozen=True)
class DType:
    code: str         # as written in the safetensors header
    torch_name: str   # attribute of the torch module
    itemsize: int
    kind: Kind

    @property
    def torch(self):
        import torch
        return getattr(torch, self.torch_name)


_TABLE = [
    DType("F64", "float64", 8, Kind.FLOAT),
    DType("F32", "float32", 4, Kind.FLOAT),
    DType("F16", "float16", 2, Kind.FLOAT),
    DType("BF16", "bfloat16", 2, Kind.FLOAT),
    DType("F8_E4M3", "float8_e4m3fn", 1, Kind.FP8),
    DType("F8_E5M2", "float8_e5m2", 1, Kind.FP8),
    DType("I64", "int64", 8, Kind.INT),
    DType("I32", "int32", 4, Kind.INT),
    DType("I16", "int16", 2, Kind.INT),
    DType("I8", "int8", 1, Kind.INT),
    DType("U64", "uint64", 8, Kind.INT),
    DType("U32", "uint32", 4, Kind.INT),
    DType("U16", "uint16", 2, Kind.INT),
    DType("U8", "uint8", 1, Kind.INT),
    DType("BOOL", "bool", 1, Kind.BOOL),
]

BY_CODE: dict[str, DType] = {d.code: d for d in _TABLE}
BY_TORCH_NAME: dict[str, DType] = {d.torch_name: d for d in _TABLE}

F32, F16, BF16 = BY_CODE["F32"], BY_CODE["F16"], BY_CODE["BF16"]
F8_E4M3, F8_E5M2, U8 = BY_CODE["F8_E4M3"], BY_CODE["F8_E5M2"], BY_CODE["U8"]


def from_torch(dtype) -> DType:
    """The table entry of a torch dtype (``torch.bfloat16`` -> BF16)."""
    return BY_TORCH_NAME[str(dtype).removeprefix("torch.")]


@dataclass(frozen=True)
class FP8Format:
    """One FP8 encoding, described once. The numbers are the OCP FP8 spec's."""

    name: str                 # torch / ComfyUI spelling
    safetensors_dtype: str    # the header's dtype string
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_finite: float
    min_normal: float
    min_subnormal: float
    has_inf: bool

    @property
    def dtype(self) -> DType:
        """Its entry in the safetensors dtype table."""
        return BY_CODE[self.safetensors_dtype]

    @property
    def torch_dtype(self):
        return self.dtype.torch


#                  name              header     e  m  bias  max      min normal  min subnormal  inf
E4M3FN = FP8Format("float8_e4m3fn", "F8_E4M3", 4, 3, 7,    448.0,   2.0 ** -6,  2.0 ** -9,     False)
E5M2 = FP8Format("float8_e5m2",     "F8_E5M2", 5, 2, 15,   57344.0, 2.0 ** -14, 2.0 ** -16,    True)

FP8_FORMATS = {f.name: f for f in (E4M3FN, E5M2)}
_FP8_BY_CODE = {f.safetensors_dtype: f for f in FP8_FORMATS.values()}


def fp8_of(code: str) -> FP8Format | None:
    """The FP8 encoding a header dtype string names (``"F8_E4M3"`` -> E4M3FN), None for other dtypes."""
    return _FP8_BY_CODE.get(code)


class Granularity(enum.Enum):
    """How many scales a quantized weight has: one, one per output row, one per 128x128 tile."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"
