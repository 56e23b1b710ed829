"""Format ``native`` (quantkit v1): FP8 weights beside float32 ``weight_scale`` tensors.

For every quantized ``<L>.weight``:
    <L>.weight        FP8 (E4M3FN or E5M2), the source's shape
    <L>.weight_scale  float32: []  per tensor | [out, 1] per channel | [ceil(out/128), ceil(in/128)] per block
    W = q * scale
    <L>.input_scale   float32 []   only with ``convert --stats``, for a layer whose input was calibrated
                                   (or carried over from an FP8 source that stores one):
                                   the static activation scale, range / 448 (activations in E4M3
                                   whatever the weights' FP8 dtype, as compressed-tensors and vLLM do):
                                   x_q = clamp(x / input_scale, +-448) as float8_e4m3fn
Every other tensor keeps its key, in the keep dtype (floats) or untouched (non-floats).
The header metadata records the quantkit version, format, FP8 dtype, granularity, policy,
the source's name and SHA256 and the quantized layers, so a file explains itself.
"""
from __future__ import annotations

import struct

from .. import dtypes
from ..errors import FormatError
from ..fp8 import Granularity
from ..writer import OutputTensor
from .base import (Emit, OutputFormat, Role, StoredTensor, carried_input_scale, input_scale_key, quantkit_metadata,
                   register, stored_with_scales, tensor_layout)

SCALE_SUFFIX = "_scale"


def granularity_from_shapes(weight_shape, scale_shape) -> Granularity:
    """Which granularity a scale of ``scale_shape`` encodes for a weight of ``weight_shape``."""
    from ..fp8 import scale_shape as expected
    for g in Granularity:
        if tuple(expected(tuple(weight_shape), g)) == tuple(scale_shape):
            return g
    raise FormatError(f"scale shape {list(scale_shape)} fits no granularity of a {list(weight_shape)} weight")


@register
class NativeFormat(OutputFormat):
    name = "native"
    recognized_last = True     # any '<L>.weight_scale' key: other formats' files have them too
    summary = "quantkit v1: <L>.weight FP8 + <L>.weight_scale float32 (tensor, channel or block scales)"

    def card_library(self, source_card: dict) -> str | None:
        return "quantkit"

    def layout(self, plan) -> list[Emit]:
        return tensor_layout(plan, self._extras)

    @staticmethod
    def _extras(t) -> list[Emit]:
        """``<L>.weight_scale`` float32, and ``<L>.input_scale`` with a static activation scale."""
        emits = [Emit(OutputTensor(t.name + SCALE_SUFFIX, dtypes.F32, t.scale_shape), Role.SCALE, t.name)]
        input_scale = carried_input_scale(t)
        if input_scale is not None and t.name.endswith(".weight"):
            emits.append(Emit(OutputTensor(input_scale_key(t.name), dtypes.F32, ()), Role.CONSTANT, t.name,
                              struct.pack("<f", input_scale)))
        return emits

    def metadata(self, plan, provenance: dict[str, str]) -> dict[str, str]:
        return quantkit_metadata(self, plan, provenance)

    @classmethod
    def recognizes(cls, file) -> bool:
        return any(k.endswith(".weight" + SCALE_SUFFIX) for k in file.tensors)

    def stored(self, file) -> dict[str, StoredTensor]:
        return stored_with_scales(file, SCALE_SUFFIX, granularity_from_shapes)
