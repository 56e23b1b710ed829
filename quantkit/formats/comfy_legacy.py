"""Format ``comfy-legacy``: ComfyUI's older ``scaled_fp8`` convention (2024-10 onwards).

    scaled_fp8          F8_E4M3 [0]   marker: its dtype is the FP8 dtype of the Linear weights
                                      (``model.diffusion_model.scaled_fp8`` in a full checkpoint)
    <L>.weight          F8_E4M3       per quantized layer, the source's shape
    <L>.scale_weight    F32 []        W = q * scale_weight
    <L>.scale_input     F32 []        a calibrated activation scale (``convert --stats``: range / 448),
                                      or one carried over from a source that has one

Loaders of this convention (ComfyUI before its mixed-precision loader, Forge, stable-diffusion.cpp,
InvokeAI...) create EVERY ``nn.Linear`` in FP8 once the marker is present, so a Linear kept in
high precision is cast to FP8 with scale 1 there (``warnings`` says so); current ComfyUI converts
the file at load (``comfy.utils.convert_old_quants``) into the ``comfy`` convention, and loads
unscaled layers in high precision. That conversion always assumes float8_e4m3fn, so E5M2 is refused.
It renames ``scale_input`` to ``input_scale`` (dropping a value of exactly 1: quantkit reads it back
as stored, the same scale there) and, with the 0-element
marker written here, leaves FP8 matrix multiplication on: a layer without ``scale_input`` then has
its input cast with scale 1 on GPUs with FP8 compute (``--format comfy`` flags such layers
``full_precision_matrix_mult`` instead).
"""
from __future__ import annotations

import re

from .. import dtypes
from ..errors import FormatError, PolicyError
from ..fp8 import E4M3FN, Granularity
from ..policy import Action, TensorKind
from ..writer import OutputTensor
from .base import Emit, Plan, Role, StoredTensor, fp8_of, layer_name, quantkit_metadata, register, tensor_layout
from .comfy import (ComfyStoredTensor, ComfyUIFile, carried, f32_bytes, input_scale,
                    quantized_layer, scale_key)

MARKER = "scaled_fp8"
SCALE_WEIGHT = ".scale_weight"
SCALE_INPUT = ".scale_input"
# A full checkpoint keeps the diffusion model under this prefix; ComfyUI looks for the marker there.
DIFFUSION_PREFIX = "model.diffusion_model."
# 2-D weights the old loaders create as nn.Linear: everything but lookup tables (nn.Embedding).
_LINEAR_KINDS = frozenset({TensorKind.LINEAR, TensorKind.ATTENTION, TensorKind.HEAD, TensorKind.EMBEDDING})
_LOOKUP_TABLE = re.compile(r"(?i)^(embed_tokens|token_embedding|word_embeddings|position_embeddings?|"
                           r"token_type_embeddings|wte|wpe|shared|relative_attention_bias)$")
EXAMPLES = 3


def is_marker(key: str) -> bool:
    return key == MARKER or key.endswith("." + MARKER)


def marker_prefix(key: str) -> str:
    """The model prefix a quantized key sits under, where ComfyUI looks for the marker."""
    return DIFFUSION_PREFIX if key.startswith(DIFFUSION_PREFIX) else ""


def examples(names: list[str]) -> str:
    return ", ".join(names[:EXAMPLES]) + (", ..." if len(names) > EXAMPLES else "")


def linear_like(t) -> bool:
    """A 2-D layer weight that a scaled_fp8 loader would create as an FP8 nn.Linear."""
    if not t.name.endswith(".weight") or len(t.info.shape) != 2 or t.decision.kind not in _LINEAR_KINDS:
        return False
    module = layer_name(t.name).rsplit(".", 1)[-1]
    return not _LOOKUP_TABLE.match(module)


@register
class ComfyLegacyFormat(ComfyUIFile):
    name = "comfy-legacy"
    input_scale_suffix = SCALE_INPUT
    summary = ("ComfyUI scaled_fp8 (older loaders): scaled_fp8 marker + <L>.weight FP8 + <L>.scale_weight F32 []"
               " (per-tensor scales, E4M3)")

    def check(self, options) -> None:
        super().check(options)
        if options.fp8 is not E4M3FN:
            raise PolicyError(f"format {self.name!r} is float8_e4m3fn only: current ComfyUI converts scaled_fp8 files"
                              " as float8_e4m3fn whatever the marker says, which would corrupt float8_e5m2 weights",
                              hint="use --format comfy for float8_e5m2")

    def layout(self, plan: Plan) -> list[Emit]:
        fp8 = dtypes.BY_CODE[plan.options.fp8.safetensors_dtype]
        prefixes = sorted({marker_prefix(t.name) for t in plan.quantized()})
        markers = [Emit(OutputTensor(p + MARKER, fp8, (0,)), Role.CONSTANT) for p in prefixes]

        def extras(t) -> list[Emit]:
            """``<L>.scale_weight``, and ``<L>.scale_input`` with an activation scale."""
            layer = quantized_layer(t, self.name)
            emits = [Emit(OutputTensor(layer + SCALE_WEIGHT, dtypes.F32, ()), Role.SCALE, t.name)]
            scale_in, _ = carried(t)
            if scale_in is not None:
                emits.append(Emit(OutputTensor(layer + SCALE_INPUT, dtypes.F32, ()), Role.CONSTANT, t.name,
                                  f32_bytes(scale_in)))
            return emits
        return tensor_layout(plan, extras, markers)

    def metadata(self, plan, provenance: dict[str, str]) -> dict[str, str]:
        return quantkit_metadata(self, plan, provenance)

    def warnings(self, plan) -> list[str]:
        quantized = [t.name for t in plan.quantized()]
        if not quantized:
            return []
        out = super().warnings(plan)
        unscaled = [t.name for t in plan.quantized() if carried(t)[0] is None]
        if len(unscaled) < len(quantized) and unscaled:
            out.append(f"format {self.name}: {len(unscaled)} quantized layer(s) have no static input scale"
                       f" ({examples(unscaled)}), and the scaled_fp8 convention cannot mark a layer weight-only:"
                       " on GPUs with FP8 compute ComfyUI quantizes their inputs with scale 1.0 (clamped to +-448);"
                       " --format comfy runs them weight-only")
        kept = [t.name for t in plan.tensors if t.action is not Action.QUANTIZE and linear_like(t)]
        if kept:
            out.append(f"format {self.name}: {len(kept)} linear weight(s) stay in high precision ({examples(kept)}),"
                       " but loaders of the scaled_fp8 convention (ComfyUI before its mixed-precision loader, Forge,"
                       " sd.cpp) create every nn.Linear in FP8 and would cast them to FP8 with scale 1; the 'comfy'"
                       " format expresses mixed precision (--format comfy), or quantize them too")
        outside = [k for k in quantized if not k.startswith(DIFFUSION_PREFIX)]
        if outside and len(outside) < len(quantized):
            out.append(f"format {self.name}: {len(outside)} quantized weight(s) lie outside {DIFFUSION_PREFIX}"
                       f" ({examples(outside)}); ComfyUI looks for a full checkpoint's scaled_fp8 marker under that"
                       " prefix only, so they may load without their scales; keep them (--keep) or use --format comfy")
        return out

    @classmethod
    def recognizes(cls, file) -> bool:
        return any(is_marker(k) or k.endswith(SCALE_WEIGHT) for k in file.tensors)

    def how_to_load(self, target: str, prov: dict) -> str:
        return (f"Copy `{target}` into `ComfyUI/models/diffusion_models/` (a text encoder: `models/text_encoders/`). "
                "Current ComfyUI converts the `scaled_fp8` layout at load; Forge and stable-diffusion.cpp read it as "
                "well (they create every linear layer in FP8).")

    def stored(self, file) -> dict[str, StoredTensor]:
        markers = {k[: -len(MARKER)]: info for k, info in file.tensors.items() if is_marker(k)}
        layer_keys = set(k for k in file.tensors if is_marker(k))
        out = {}
        for key, info in file.tensors.items():
            if not key.endswith(SCALE_WEIGHT):
                continue
            layer = key[: -len(SCALE_WEIGHT)]
            weight = file.tensors.get(layer + ".weight")
            fp8 = fp8_of(weight.dtype.code) if weight is not None else None
            if fp8 is None:
                raise FormatError(f"{key} scales no FP8 weight ({layer}.weight is missing or not FP8)",
                                       path=file.path, tensor=key)
            # Read as stored, 1.0 included: ComfyUI drops a scale of exactly 1, the value it assumes
            # for a layer without one (FP8 matmul on); kept, it means the same there, and a conversion
            # into a format whose layers without a scale run weight-only keeps it.
            scale_in = input_scale(file, file.tensors.get(layer + SCALE_INPUT))
            marker = max((p for p in markers if layer.startswith(p)), key=len, default=None)
            # A 2-element marker turns ComfyUI's FP8 matmul off for the whole file.
            full_precision = marker is not None and markers[marker].numel == 2
            out[weight.name] = ComfyStoredTensor(weight.name, weight.name, scale_key(file, info), Granularity.TENSOR,
                                                 fp8, input_scale_key=None if scale_in is None else layer + SCALE_INPUT,
                                                 input_scale=scale_in, full_precision_matrix_mult=full_precision)
            layer_keys.update({key, layer + SCALE_INPUT})
        for key in file.tensors:
            if key not in out and key not in layer_keys:
                out[key] = StoredTensor(key, key)
        return out
