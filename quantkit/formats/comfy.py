"""Format ``comfy``: ComfyUI's mixed-precision convention (``comfy_quant`` markers).

For every quantized ``<L>.weight`` (a 2-D Linear or Embedding weight):
    <L>.weight        F8_E4M3 (or F8_E5M2), the source's shape
    <L>.weight_scale  F32 []                   per tensor only; W = q * scale
    <L>.comfy_quant   U8 [n]                   UTF-8 bytes of the compact JSON
                      {"format":"float8_e4m3fn","full_precision_matrix_mult":true}
    <L>.input_scale   F32 []                   only with a calibrated activation scale (then the
                                               flag is left out and FP8 matmul may use it)
Layers without a marker load in high precision: that is how ComfyUI expresses what is kept.
With ``--comfy-header-metadata`` the header's ``__metadata__`` also holds
``_quantization_metadata`` = ``{"format_version":"1.0","layers":{<L>: <same JSON>}}``, with
layer names equal to the file's key stems (ComfyUI uses them verbatim).

ComfyUI (``comfy/utils.py`` ``detect_layer_quantization``) switches a model to its mixed ops
when any key ends in ``.comfy_quant``; each layer then reads ``json.loads(marker bytes)`` and
builds a comfy-kitchen ``QuantizedTensor`` from the weight and ``Params(scale=weight_scale)``.
``full_precision_matrix_mult`` is set on every layer without an activation scale: without one
ComfyUI's FP8 matmul would quantize activations with scale 1 (clamping them to +-448). With
``convert --stats`` a layer whose input was calibrated gets ``<L>.input_scale`` (range / the FP8
maximum of its weight's dtype: ComfyUI quantizes the input in that dtype) and no flag, so
ComfyUI's FP8 matmul (``comfy/ops.py`` ``mixed_precision_ops``: ``QuantizedTensor.from_float(x,
layout, scale=input_scale)``; GPUs with FP8 compute only, elsewhere the weight is dequantized)
uses it. ComfyUI registers ``input_scale`` as a parameter as stored (F32 [] here).
Unknown ``__metadata__`` keys (quantkit's provenance) are ignored by ComfyUI.

The model must carry the key names ComfyUI loads natively. A file already under ComfyUI's own names
(FLUX.1 and FLUX.2 under BFL's, AuraFlow, Wan, HunyuanVideo, LTX, HiDream and every other family in
docs/presets.md "Families under ComfyUI's names") is written under those names, and ComfyUI's own
loader reads every FP8 layer of it with its scale (checked per family, docs/presets.md "Checked
through ComfyUI's loader"). A diffusers FLUX.1 or SD3 transformer or SD1.x/SD2.x/SDXL UNet is read
under BFL's / SAI's / LDM's names (``quantkit.comfy_names``). What ComfyUI would rename on load is
refused when anything in it is quantized (``RENAMED_ON_LOAD``: a diffusers-named ControlNet (FLUX,
SD3, SD), AuraFlow transformer or VAE; ComfyUI renames those keys on load and the scales would be
lost).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from .. import dtypes
from ..errors import FormatError, PolicyError
from ..fp8 import FP8_FORMATS, Granularity
from ..writer import OutputTensor
from .base import (INPUT_SCALE, Emit, OutputFormat, Plan, Role, ScaledStoredTensor, StoredTensor, carried_input_scale,
                   fp8_of, layer_name, quantkit_metadata, register, tensor_layout)

MARKER = ".comfy_quant"
WEIGHT_SCALE = ".weight_scale"
HEADER_KEY = "_quantization_metadata"
HEADER_VERSION = "1.0"
MAX_MARKER_BYTES = 1 << 16     # a layer config is a few dozen bytes; anything huge is not one


@dataclass(frozen=True)
class ComfyStoredTensor(ScaledStoredTensor):
    """A quantized layer of a ComfyUI file, with what its layer config adds to the scale (and its
    calibrated activation scale, ``input_scale``, when the file has one)."""

    full_precision_matrix_mult: bool = True   # what the source asked for when it has an input scale

    @property
    def input_fp8(self):
        """ComfyUI quantizes a layer's input in its weight's layout: E5M2 for an E5M2 layer (whose
        input_scale quantkit writes over 57344)."""
        return self.fp8 or super().input_fp8


def layer_config(fp8_name: str, input_scale: float | None = None, full_precision_matrix_mult: bool = True) -> dict:
    """The per-layer JSON object ComfyUI reads from ``<L>.comfy_quant`` (and the header)."""
    conf: dict = {"format": fp8_name}
    # Without a calibrated activation scale ComfyUI's FP8 matmul would cast activations with
    # scale 1 (clamping them to +-448), so the layer asks for its weight to be dequantized instead.
    if input_scale is None or full_precision_matrix_mult:
        conf["full_precision_matrix_mult"] = True
    return conf


def encode_config(conf: dict) -> bytes:
    """Compact, key-sorted JSON as UTF-8 (the bytes Comfy-Org's own exporter writes)."""
    return json.dumps(conf, sort_keys=True, separators=(",", ":")).encode("utf-8")


def f32_bytes(value: float) -> bytes:
    return struct.pack("<f", value)


def quantized_layer(t, fmt_name: str) -> str:
    """``<L>`` of a quantized tensor, refusing what ComfyUI's mixed ops cannot load as FP8."""
    if not t.name.endswith(".weight") or len(t.info.shape) != 2:
        raise PolicyError(f"format {fmt_name!r} stores FP8 only for 2-D '.weight' tensors (Linear and Embedding"
                          f" layers); {t.name} {list(t.info.shape)} would not load in ComfyUI",
                          tensor=t.name, hint="keep it in high precision: drop --quantize-conv or add --keep PATTERN")
    return layer_name(t.name)


# ComfyUI loads a diffusion model under its own (original-release) key names. A diffusers-named
# file it does not recognise natively is renamed on load (``model_detection.convert_diffusers_mmdit``
# or ``utils.unet_to_diffusers``), through maps that carry ``.weight``/``.bias`` keys only (and fuse
# FLUX's q/k/v by copying raw values): ``.weight_scale``, ``.comfy_quant`` and ``scaled_fp8`` are
# dropped, and the FP8 codes would load as weights without their scales. Keys that make ComfyUI take
# that path, as it tests them (Qwen-Image is absent: ComfyUI's own names are diffusers').
RENAMED_ON_LOAD = (
    ("a diffusers FLUX ControlNet", ("controlnet_x_embedder.weight", "transformer_blocks.0.attn.to_q.weight")),
    ("a diffusers FLUX transformer", ("x_embedder.weight", "transformer_blocks.0.attn.to_q.weight")),
    ("a diffusers SD3 transformer", ("pos_embed.proj.weight", "transformer_blocks.0.attn.add_q_proj.weight")),
    ("a diffusers AuraFlow transformer", ("joint_transformer_blocks.0.attn.add_k_proj.weight",)),
    ("a diffusers SD ControlNet", ("controlnet_cond_embedding.conv_in.weight",)),
    ("a diffusers UNet", ("conv_in.weight", "time_embedding.linear_1.weight")),
    ("a diffusers VAE", ("decoder.up_blocks.0.resnets.0.norm1.weight",)),
)


def renamed_by_comfyui(names) -> str | None:
    """What ComfyUI would rename on load (see RENAMED_ON_LOAD), or None."""
    names = set(names)
    return next((what for what, keys in RENAMED_ON_LOAD if all(k in names for k in keys)), None)


def refuse_renamed(fmt_name: str, plan) -> None:
    """Refuse to quantize a model whose scales ComfyUI would drop while renaming its keys."""
    what = renamed_by_comfyui(t.name for t in plan.tensors)
    if what is not None and plan.quantized():
        raise PolicyError(f"format {fmt_name!r}: {plan.source} holds {what}; ComfyUI renames such keys on load and"
                          " drops the FP8 scales, so the weights would load wrong",
                          hint="for ComfyUI, convert the original release with its own key names, such as BFL's"
                               " flux1-dev.safetensors; for diffusers, write --format native")


def carried(t) -> tuple[float | None, bool]:
    """(input_scale, full_precision_matrix_mult) of a quantized layer: from a stats file's activation
    range (FP8 matrix multiplication then on), else carried over from an already-quantized source
    (of any format: a scale it stores turns FP8 matrix multiplication on unless a ComfyUI source
    asked for full precision).

    ComfyUI quantizes a layer's input with the layout of its weight (``QUANT_ALGOS[format]``:
    ``TensorCoreFP8E5M2Layout`` for float8_e5m2 weights), ``x / input_scale`` clamped to the FP8
    maximum: the scale is the range over the maximum of the weight's FP8 dtype, 57344 for E5M2."""
    input_scale = carried_input_scale(t, fp8_of(t.out_dtype.code))
    if t.input_range is not None:
        return input_scale, False
    return input_scale, getattr(t.prequantized, "full_precision_matrix_mult", input_scale is None)


def fp8_name_of(t) -> str:
    return fp8_of(t.out_dtype.code).name


class ComfyUIFile(OutputFormat):
    """What the two ComfyUI conventions share: one file, scalar scales, ComfyUI's key names."""

    shardable = False          # ComfyUI loads one file
    source_names = "comfyui"   # diffusers FLUX.1 / SD3 / UNets under the original names (quantkit.comfy_names)
    granularities = frozenset({Granularity.TENSOR})
    card_tags = ("comfyui",)

    def check_plan(self, plan: Plan) -> None:
        refuse_renamed(self.name, plan)
        for t in plan.quantized():
            quantized_layer(t, self.name)


@register
class ComfyFormat(ComfyUIFile):
    name = "comfy"
    summary = ("ComfyUI mixed precision: <L>.weight FP8 + <L>.weight_scale F32 [] + <L>.comfy_quant JSON marker"
               " (per-tensor scales)")

    def layer_configs(self, plan) -> dict[str, dict]:
        """``<L>`` -> layer config of every quantized layer."""
        out = {}
        for t in plan.quantized():
            input_scale, full_precision = carried(t)
            out[quantized_layer(t, self.name)] = layer_config(fp8_name_of(t), input_scale, full_precision)
        return out

    def layout(self, plan: Plan) -> list[Emit]:
        configs = self.layer_configs(plan)

        def extras(t) -> list[Emit]:
            """``<L>.weight_scale``, ``<L>.input_scale`` with an activation scale, the ``<L>.comfy_quant`` marker."""
            layer = layer_name(t.name)
            emits = [Emit(OutputTensor(layer + WEIGHT_SCALE, dtypes.F32, ()), Role.SCALE, t.name)]
            input_scale, _ = carried(t)
            if input_scale is not None:
                emits.append(Emit(OutputTensor(layer + INPUT_SCALE, dtypes.F32, ()), Role.CONSTANT, t.name,
                                  f32_bytes(input_scale)))
            marker = encode_config(configs[layer])
            emits.append(Emit(OutputTensor(layer + MARKER, dtypes.U8, (len(marker),)), Role.CONSTANT, t.name, marker))
            return emits
        return tensor_layout(plan, extras)

    def metadata(self, plan, provenance: dict[str, str]) -> dict[str, str]:
        meta = quantkit_metadata(self, plan, provenance)
        if plan.options.comfy_header_metadata:
            meta[HEADER_KEY] = json.dumps({"format_version": HEADER_VERSION, "layers": self.layer_configs(plan)},
                                          sort_keys=True, separators=(",", ":"))
        return meta

    @classmethod
    def recognizes(cls, file) -> bool:
        return HEADER_KEY in file.metadata or any(k.endswith(MARKER) for k in file.tensors)

    def how_to_load(self, target: str, prov: dict) -> str:
        body = (f"Copy `{target}` into `ComfyUI/models/diffusion_models/` (a text encoder: `models/text_encoders/`) "
                "and load it with the Load Diffusion Model (or Load CLIP) node. ComfyUI reads each quantized layer's "
                "`comfy_quant` marker and `weight_scale` (mixed-precision loading); layers without a marker load in "
                "high precision.")
        if prov["calibration"]["activations"]:
            body += (" Layers with a calibrated `input_scale` (activations: static scales from the statistics "
                     "file, see Recipe) have no `full_precision_matrix_mult` flag: on a GPU with FP8 compute "
                     "ComfyUI multiplies them in FP8 with that scale; elsewhere it dequantizes the weight.")
        return body

    def stored(self, file) -> dict[str, StoredTensor]:
        configs = read_configs(file)
        layer_keys = set()
        out = {}
        for layer, conf in configs.items():
            s = read_layer(file, layer, conf)
            out[s.source_key] = s
            layer_keys.update(k for k in (layer + MARKER, s.scale_key, layer + INPUT_SCALE) if k in file.tensors)
        for key in file.tensors:
            if key not in out and key not in layer_keys:
                out[key] = StoredTensor(key, key)
        return out


def read_configs(file) -> dict[str, dict]:
    """Layer -> config from the per-layer markers, then the header (which wins, as in ComfyUI)."""
    configs = {}
    for key, info in file.tensors.items():
        if not key.endswith(MARKER):
            continue
        if info.dtype is not dtypes.U8 or len(info.shape) != 1 or info.nbytes > MAX_MARKER_BYTES:
            raise FormatError(f"a layer marker must be a 1-D U8 tensor of JSON bytes, not {info.dtype.code}"
                                   f" {list(info.shape)}", path=file.path, tensor=key)
        configs[key[: -len(MARKER)]] = _config(file.read_tensor(info).numpy().tobytes(), file, key)
    raw = file.metadata.get(HEADER_KEY)
    if raw is not None:
        doc = _config(raw.encode("utf-8"), file, HEADER_KEY)
        layers = doc.get("layers")
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            raise FormatError(f"header {HEADER_KEY} has no 'layers' object of layer configs", path=file.path)
        configs.update(layers)
    return configs


def _config(raw: bytes, file, where: str) -> dict:
    try:
        conf = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError("layer config is not UTF-8 JSON", path=file.path, tensor=where) from None
    if not isinstance(conf, dict):
        raise FormatError("layer config is not a JSON object", path=file.path, tensor=where)
    return conf


def read_layer(file, layer: str, conf: dict) -> ComfyStoredTensor:
    """How one marked layer is stored: FP8 weight, per-tensor F32 scale, optional input scale."""
    weight, scale = file.tensors.get(layer + ".weight"), file.tensors.get(layer + WEIGHT_SCALE)
    name = conf.get("format")
    fmt = FP8_FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise FormatError(f"layer format {name!r} is not FP8 (quantkit reads float8_e4m3fn and"
                               " float8_e5m2)", path=file.path, tensor=layer)
    if weight is None or scale is None:
        raise FormatError(f"a marked layer needs {layer}.weight and {layer}{WEIGHT_SCALE}", path=file.path,
                               tensor=layer)
    if fp8_of(weight.dtype.code) is not fmt:
        # ComfyUI would convert the weight's values to the marked dtype: garbage, not a reinterpretation.
        raise FormatError(f"weight is {weight.dtype.code} but its marker says {fmt.name}", path=file.path,
                               tensor=weight.name)
    scale_in = file.tensors.get(layer + INPUT_SCALE)
    return ComfyStoredTensor(weight.name, weight.name, scale_key(file, scale), Granularity.TENSOR, fmt,
                             input_scale_key=scale_in.name if scale_in is not None else None,
                             input_scale=input_scale(file, scale_in),
                             full_precision_matrix_mult=bool(conf.get("full_precision_matrix_mult", False)))


def scale_key(file, info) -> str:
    """A per-tensor scale: one float value (F32 0-dim as written; [1] and 16-bit floats, which ComfyUI
    casts to float32 on load, are read too)."""
    if info.dtype.kind is not dtypes.Kind.FLOAT or info.numel != 1 or len(info.shape) > 1:
        raise FormatError(f"scale must be one float value (shape []), not {info.dtype.code} {list(info.shape)}",
                               path=file.path, tensor=info.name, hint="only per-tensor scales are ComfyUI FP8")
    return info.name


def input_scale(file, info) -> float | None:
    """The value of an activation scale tensor, or None when there is none."""
    if info is None:
        return None
    return float(file.read_tensor(file.tensors[scale_key(file, info)]).reshape(()).item())
