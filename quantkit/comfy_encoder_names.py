"""A transformers-named text encoder under the names ComfyUI's text-encoder loaders read.

ComfyUI builds its decoder text encoders (``comfy/text_encoders/llama.py``: Qwen2.5-VL, Qwen3,
Mistral 3, Gemma 3, Llama 3) as ``model.`` + the decoder, with Qwen2.5-VL's vision tower as
``visual.`` and Gemma 3 12B's as ``vision_model.`` + ``multi_modal_projector.``; it tells them
apart by those keys (``comfy/sd.py`` ``detect_te_model``: ``model.layers.0.*``) and loads with
``strict=False``. transformers 5 holds a vision-language model's decoder under
``model.language_model.`` (and saves it under ``language_model.model.``) and a bare decoder (``Qwen3Model``) unprefixed: ComfyUI would detect
nothing in either. So::

    transformers                                 ComfyUI
    model.language_model.X, language_model.model.X   model.X
    X  (a bare decoder: layers., embed_tokens.)  model.X
    model.visual.X                               visual.X             (Qwen2.5-VL)
    [model.]vision_tower.[vision_model.]X        vision_model.X       (Gemma 3)
    [model.]multi_modal_projector.X              multi_modal_projector.X  (Gemma 3)
    [model.]vision_tower.*, multi_modal_projector.*   dropped         (Mistral 3, LLaVA: ComfyUI has no tower)
    lm_head.weight, language_model.lm_head.weight     dropped         (every encoder config: lm_head=False)

A dropped tensor is named in the view's note. UMT5/T5 and ``model.``-named decoders
(``*ForCausalLM``, ComfyUI's own files) are read as they are.
"""
from __future__ import annotations

from .comfy_names import COMFYUI, RenamedView

_DECODERS = ("model.language_model.", "language_model.model.")     # transformers 5's state dict, its save
_TOWERS = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


def _rename(name: str, gemma: bool, bare: bool) -> str | None:
    """ComfyUI's name for transformers' ``name``; None where ComfyUI loads nothing of it."""
    if name.endswith("lm_head.weight") and name.count(".") <= 2:
        return None
    if bare:
        return "model." + name
    for prefix in _DECODERS:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith(_TOWERS):
        if not gemma:
            return None
        rest = name[len("model."):] if name.startswith("model.") else name
        if rest.startswith("vision_tower."):
            rest = rest[len("vision_tower."):]
            return rest if rest.startswith("vision_model.") else "vision_model." + rest
        return rest
    return name


def comfyui_encoder_view(checkpoint):
    """``checkpoint`` under ComfyUI's text-encoder names when it is a transformers-named decoder
    encoder (a vision-language model's decoder under ``model.language_model.`` /
    ``language_model.model.``, a bare decoder, or Qwen2.5-VL with its lm_head), else None."""
    tensors = checkpoint.tensors
    q = "layers.0.self_attn.q_proj.weight"
    vlm = any(p + q in tensors for p in _DECODERS)
    bare = q in tensors and "embed_tokens.weight" in tensors and not any(k.startswith("model.") for k in tensors)
    qwen_vl = "model." + q in tensors and "lm_head.weight" in tensors and any(
        k.startswith(("visual.", "model.visual.")) for k in tensors)
    if not (vlm or bare or qwen_vl):
        return None
    gemma = any(p + "mm_input_projection_weight" in tensors for p in _TOWERS[2:])
    parts, dropped = {}, []
    for name, info in tensors.items():
        new = _rename(name, gemma, bare)
        if new is None:
            dropped.append(name)
        else:
            parts[new] = [(name, 0, info.shape[0] if info.shape else 1)]
    what = "bare decoder" if bare else "vision-language model"
    note = (f"transformers {what} names written as ComfyUI's text-encoder names (model.layers.N ...): "
            f"{len(tensors)} tensors -> {len(parts)}")
    if dropped:
        heads = sum(1 for n in dropped if "lm_head" in n)
        note += (f"; dropped {len(dropped)} that ComfyUI's encoder does not load ({heads} lm_head, "
                 f"{len(dropped) - heads} of the vision tower and projector)")
    return RenamedView(checkpoint, parts, COMFYUI, note)
