"""Text-encoder presets of the diffusion families: UMT5-XXL (Wan), Qwen2.5-VL (Qwen-Image, HunyuanVideo
1.5), Qwen3 (Z-Image), Mistral-Small 3 (FLUX.2), Gemma 3 (LTX-2), Llama 3 / LLaVA-Llama 3 (HunyuanVideo).

Each is a narrower twin of ``t5_encoder`` or ``llm`` (whose rules it shares), recognised by what sets
the family apart under transformers' names and ComfyUI's alike: UMT5's relative attention bias in
every block, Qwen2.5-VL's q/k/v biases beside its ``visual.`` tower, Qwen3's q_norm/k_norm, Gemma 3's
four norms per layer with q_norm, Mistral 3's ``patch_merger`` (or ComfyUI's 5120-wide text-only file),
LLaVA's ``vision_tower`` + ``multi_modal_projector.linear_1`` (or Llama 3's 128k vocabulary). They
register before ``t5_encoder`` and ``llm`` so ``auto`` names the family and its variant; a plain T5
or Llama checkpoint still reads as before. They are not ``bundled``: in an all-in-one checkpoint the
``t5_encoder`` / ``llm`` rules go on applying to these encoders (the same decisions).

What ComfyUI loads (``comfy/sd.py`` ``detect_te_model``, ``comfy/text_encoders/llama.py``): every
decoder under ``model.`` (``model.layers.N``), Qwen2.5-VL's tower as ``visual.``, Gemma 3's as
``vision_model.`` with ``multi_modal_projector.``; no lm_head (every encoder config has
``lm_head=False``) and no tower for Mistral 3 or LLaVA. ``comfy_encoder_names`` writes
transformers-named files under those names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..policy import Action, Rule
from .base import _WHY_NORMS, K, Q, _Architecture, _mat, _preset, _rule, _Signature


# The rules of t5_encoder and llm (encoders.py), which these presets share.
_T5_RULES = (
    (Q, r"re:(encoder|decoder)\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|k|v|o)\.weight"),
    (Q, r"re:(encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1)\.weight"),
    (K, r"re:(encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense\.wo"),
    (K, "shared"), (K, "encoder.embed_tokens"), (K, "decoder.embed_tokens"), (K, "lm_head"),
)

_LLM_RULES = (
    (Q, r"re:layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj|qkv_proj)\.weight"),
    (Q, r"re:layers\.\d+\.mlp\.(.+\.)?(gate_proj|up_proj|down_proj|gate_up_proj)\.weight"),
    (Q, r"re:layers\.\d+\.block_sparse_moe\.experts\.\d+\.(w1|w2|w3)\.weight"),
    (K, r"re:layers\.\d+\.(mlp|block_sparse_moe)\.(gate|router|shared_expert_gate)"),
    (K, "embed_tokens"), (K, "../lm_head"),
    (K, "*visual.*"), (K, "*vision_tower.*"), (K, "*vision_model.*"), (K, "*multi_modal_projector.*"),
    (K, "*mm_projector.*"),
)


@dataclass(frozen=True)
class _Narrowed(_Architecture):
    """An architecture found only at roots where ``accept(infos, root)`` also holds."""

    accept: Callable[[dict, str], bool] = lambda infos, root: True
    # Rules relative to the checkpoint's top above the decoder (``_parent``): heads and towers.
    top_rules: tuple[tuple[Action, str], ...] = ()

    def find(self, infos: dict, loose: bool = False):
        return [(root, sig) for root, sig in super().find(infos, loose) if self.accept(infos, root)]

    def rules(self, infos: dict) -> tuple[Rule, ...]:
        roots = [root for root, _ in (self.find(infos) or self.find(infos, loose=True))] or [""]
        extra = tuple(_rule(action, _parent(root), pattern) for root in roots for action, pattern in self.top_rules)
        return tuple(dict.fromkeys(super().rules(infos) + extra))


def _parent(root: str) -> str:
    """The prefix above a decoder's root: '' for 'model.' and 'model.language_model.' alike."""
    for tail in ("model.language_model.", "language_model.model.", "language_model.", "model."):
        if root.endswith(tail):
            return root[:-len(tail)]
    return root


def _has(infos: dict, *keys: str) -> bool:
    return all(k in infos for k in keys)


def _any_under(infos: dict, prefixes: tuple[str, ...]) -> bool:
    return any(k.startswith(prefixes) for k in infos)


def _layers(infos: dict, root: str) -> int:
    rx = re.compile(re.escape(root) + r"layers\.(\d+)\.")
    return 1 + max((int(m[1]) for k in infos if (m := rx.match(k))), default=-1)


def _hidden(infos: dict, root: str) -> int:
    ln = infos.get(root + "layers.0.input_layernorm.weight")
    return ln.shape[0] if ln is not None else 0


def _with_tower(infos: dict, root: str, towers: tuple[str, ...]) -> bool:
    up = _parent(root)
    return _any_under(infos, tuple(up + t for t in towers))


# Decoder layer markers, relative to the root.
def _qk_norm(infos, root):
    return _has(infos, root + "layers.0.self_attn.q_norm.weight", root + "layers.0.self_attn.k_norm.weight")


def _gemma_norms(infos, root):
    return _has(infos, root + "layers.0.pre_feedforward_layernorm.weight",
                root + "layers.0.post_feedforward_layernorm.weight")


def _qkv_bias(infos, root):
    return root + "layers.0.self_attn.k_proj.bias" in infos


_QWEN_VISUAL = ("visual.blocks.", "model.visual.blocks.", "visual.merger.", "model.visual.merger.")
_PIXTRAL = ("model.multi_modal_projector.patch_merger.", "multi_modal_projector.patch_merger.")
_LLAVA = ("model.multi_modal_projector.linear_1.", "multi_modal_projector.linear_1.")
_GEMMA_VISION = ("model.vision_tower.", "vision_tower.", "vision_model.")


def _decoder(accept) -> _Narrowed:
    return _Narrowed((
        _Signature(r"layers\.(?P<i>\d+)\.self_attn\.q_proj\.weight",
                   ("layers.{i}.self_attn.o_proj.weight", "layers.{i}.input_layernorm.weight"),
                   lambda q, o, ln: len(ln) == 1 and _mat(q, None, ln[0]) and _mat(o, ln[0]), _LLM_RULES),
    ), accept=accept, top_rules=_TOP_RULES)


# Beside the decoder, wherever transformers or ComfyUI put them: the head and every vision part.
_TOP_RULES = ((K, "lm_head"), (K, "model.lm_head"), (K, "*visual.*"), (K, "*vision_tower.*"),
              (K, "*vision_model.*"), (K, "*multi_modal_projector.*"))

_SIZES = {   # (hidden, layers) -> size, as the published checkpoints have them
    "qwen25_vl": {(3584, 28): "7B", (2048, 36): "3B", (8192, 80): "72B", (5120, 64): "32B"},
    "qwen3": {(2560, 36): "4B", (1024, 28): "0.6B", (2048, 28): "1.7B", (4096, 36): "8B", (5120, 40): "14B"},
    "mistral3": {(5120, 40): "24B", (3072, 26): "3B"},
    "gemma3": {(3840, 48): "12B", (2560, 34): "4B", (1152, 26): "1B", (5376, 62): "27B"},
    "llama3": {(4096, 32): "8B", (3072, 28): "3B", (2048, 16): "1B", (8192, 80): "70B"},
}


def _size(family: str, infos: dict, root: str) -> str:
    h, n = _hidden(infos, root), _layers(infos, root)
    size = _SIZES[family].get((h, n))
    if size is None and family == "mistral3" and h == 5120:
        return f"24B (pruned to {n} layers)"      # FLUX.2's text-encoder files keep the first layers only
    return size or f"(hidden {h}, {n} layers)"


def _vision_note(infos, root, towers) -> str:
    return " (with vision tower)" if _with_tower(infos, root, towers) else " (text only)"


# ----------------------------------------------------------------------------- UMT5

def _umt5(infos, root):
    # UMT5 gives every block its own relative attention bias; T5 only block 0.
    return root + "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in infos


def _umt5_variant(infos, root):
    q = infos.get(root + "encoder.block.0.layer.0.SelfAttention.q.weight")
    if q is None:               # a shard without the first block
        return "UMT5 encoder"
    n = 1 + max(int(m[1]) for k in infos if (m := re.match(re.escape(root) + r"encoder\.block\.(\d+)\.", k)))
    size = {(4096, 24): "XXL", (2048, 24): "XL", (1024, 24): "Large", (768, 12): "Base"}.get((q.shape[1], n))
    return f"UMT5-{size} encoder" if size else f"UMT5 encoder (d_model {q.shape[1]}, {n} blocks)"


UMT5 = _preset(
    "umt5", "UMT5 encoder (Wan 2.1/2.2's umt5-xxl): the T5 rules, wo and every block's attention bias kept",
    _Narrowed((
        _Signature(r"encoder\.block\.(?P<i>\d+)\.layer\.0\.SelfAttention\.q\.weight",
                   ("encoder.block.{i}.layer.1.DenseReluDense.wo.weight",),
                   lambda q, wo: _mat(q) and _mat(wo, q[1]),
                   _T5_RULES + ((K, r"re:encoder\.block\.\d+\.layer\.0\.SelfAttention\.relative_attention_bias"),)),
    ), accept=_umt5),
    detection=("the t5_encoder signature (encoder.block.N.layer.0.SelfAttention.q with layer.1.DenseReluDense.wo) "
               "plus encoder.block.1.layer.0.SelfAttention.relative_attention_bias: UMT5 has one per block, T5 "
               "only in block 0. transformers' UMT5EncoderModel and ComfyUI's umt5_xxl files use the same names"),
    quantizes=(("SelfAttention q, k, v, o", "as t5_encoder; ComfyUI's umt5_xxl_fp8_e4m3fn_scaled quantizes the "
                "block linears"),
               ("DenseReluDense wi_0, wi_1", "the gated FFN's input projections")),
    keeps=(("DenseReluDense.wo", "as t5_encoder: UMT5 is T5 v1.1's architecture, its FFN output overflows FP16 "
            "and transformers keeps it in FP32 (_keep_in_fp32_modules = ['wo'])"),
           ("relative_attention_bias of every block", "UMT5's per-block position-bias lookup tables "
            "([32 buckets, heads]): an embedding, not a matmul"),
           ("shared / embed_tokens", "the 256k-token lookup table (1 GB of UMT5-XXL's 11 GB): not a matmul"),
           ("layer_norm, final_layer_norm", _WHY_NORMS)),
    reference=("Comfy-Org's umt5_xxl_fp8_e4m3fn_scaled quantizes every block linear, wo included; keeping wo "
               r"costs ~1.0B parameters in BF16. Add --quantize 're:.*DenseReluDense\.wo\.weight' to match it. "
               "No renaming: ComfyUI reads transformers' UMT5 names as they are (a T5_XXL by wi_1's 10240 rows, "
               "loaded as Wan's umt5xxl)."),
    attention="SelfAttention.q/k/v/o",
    variant=_umt5_variant,
)


# ----------------------------------------------------------------------------- decoder-based encoders

def _qwen25_vl(infos, root):
    if not _qkv_bias(infos, root) or _qk_norm(infos, root):
        return False
    return _with_tower(infos, root, _QWEN_VISUAL) or _hidden(infos, root) == 3584


QWEN25_VL = _preset(
    "qwen25_vl", "Qwen2.5-VL (Qwen-Image, HunyuanVideo 1.5 text encoder): decoder linears FP8, vision tower kept",
    _decoder(_qwen25_vl),
    detection=("the llm signature with self_attn.k_proj.bias (Qwen2's q/k/v biases), no q_norm, and a "
               "Qwen2.5-VL vision tower (visual.blocks / visual.merger; model.visual. under transformers 5) "
               "beside the decoder, or a 3584-wide decoder (ComfyUI's QWEN25_7B text-only file). Decoder under "
               "model. (ComfyUI, transformers 4) or model.language_model. (transformers 5)"),
    quantizes=(("self_attn q/k/v/o_proj, mlp gate/up/down_proj of the decoder", "as llm: the bulk of the "
                "weights; ComfyUI's qwen_2.5_vl_7b_fp8_scaled quantizes them"),),
    keeps=(("embed_tokens", "the 152k-token lookup table"),
           ("lm_head", "the conditioning uses hidden states, never logits: ComfyUI builds no lm_head for this "
            "encoder (Qwen25_7BVLI_Config lm_head=False). Kept BF16 under transformers' names; the comfy "
            "formats drop it (1.1 GB of the 7B)"),
           ("visual.* (the vision tower and its merger)", "it runs only when a prompt carries an image "
            "(Qwen-Image-Edit) and is 0.67B of 8.3B parameters; modelopt leaves vision towers unquantized, and "
            "its patch embedding is a Conv3d ComfyUI loads as is. ComfyUI builds it for this encoder "
            "(Qwen25_7BVLI.visual), so it is written, renamed to visual."),
           ("norms (input_layernorm, post_attention_layernorm, model.norm), q/k/v biases", _WHY_NORMS)),
    reference=("Matches the llm preset on the decoder. Whether Comfy-Org's qwen_2.5_vl_7b_fp8_scaled quantizes "
               "the vision tower's linears could not be checked (no access to its header); keeping it costs "
               "~0.6 GB. --quantize 're:.*visual\\.blocks\\..*\\.weight' quantizes its block linears."),
    attention="self_attn.q_proj/k_proj/v_proj/o_proj",
    variant=lambda infos, root: f"Qwen2.5-VL {_size('qwen25_vl', infos, root)}"
                                f"{_vision_note(infos, root, _QWEN_VISUAL)}",
)


def _gemma3(infos, root):
    return _gemma_norms(infos, root) and _qk_norm(infos, root)


GEMMA3 = _preset(
    "gemma3", "Gemma 3 (LTX-2 text encoder): decoder linears FP8, vision tower and projector kept",
    _decoder(_gemma3),
    detection=("the llm signature with pre_feedforward_layernorm, post_feedforward_layernorm and q_norm/k_norm "
               "in the layers (Gemma 2 has no q_norm); decoder under model. (ComfyUI, Gemma3TextModel's "
               "ForCausalLM) or model.language_model. (Gemma3ForConditionalGeneration), or unprefixed "
               "(Gemma3TextModel)"),
    quantizes=(("self_attn q/k/v/o_proj, mlp gate/up/down_proj", "as llm"),),
    keeps=(("embed_tokens", "the 262k-token scaled embedding: 2 GB of Gemma 3 12B, a lookup table"),
           ("lm_head", "tied to embed_tokens in Gemma 3 (usually not saved); ComfyUI builds none "
            "(Gemma3_12B_Config lm_head=False): the comfy formats drop one if present"),
           ("vision_tower (SigLIP) and multi_modal_projector", "ComfyUI builds both for Gemma 3 12B "
            "(vision_model., multi_modal_projector.) and runs them for image prompts; the projector's "
            "mm_input_projection_weight is a bare parameter ComfyUI multiplies directly, so it cannot hold FP8. "
            "The tower is 0.4B of 12B: kept BF16 as modelopt does"),
           ("all four norms per layer, q_norm/k_norm, model.norm", _WHY_NORMS)),
    reference=("Matches the llm preset on the decoder. Vision tower kept BF16 (not checked against a published "
               "Gemma 3 FP8 text-encoder file)."),
    attention="self_attn.q_proj/k_proj/v_proj/o_proj",
    variant=lambda infos, root: f"Gemma 3 {_size('gemma3', infos, root)}"
                                f"{_vision_note(infos, root, _GEMMA_VISION)}",
)


def _qwen3(infos, root):
    return (_qk_norm(infos, root) and not _gemma_norms(infos, root) and not _qkv_bias(infos, root)
            and not _with_tower(infos, root, _QWEN_VISUAL + ("visual.", "model.visual.")))


QWEN3 = _preset(
    "qwen3", "Qwen3 (Z-Image's qwen_3_4b text encoder, other Qwen3 decoders): decoder linears FP8",
    _decoder(_qwen3),
    detection=("the llm signature with q_norm/k_norm in the layers, no q/k/v biases, no Gemma norms and no "
               "vision tower; decoder under model. (ComfyUI, Qwen3ForCausalLM) or unprefixed (Qwen3Model)"),
    quantizes=(("self_attn q/k/v/o_proj, mlp gate/up/down_proj", "as llm"),),
    keeps=(("embed_tokens", "the 152k-token lookup table (0.78 GB of the 4B)"),
           ("lm_head", "tied to embed_tokens in Qwen3 4B; ComfyUI builds none for Z-Image (Qwen3_4BConfig "
            "lm_head=False). Kept BF16 where present"),
           ("q_norm, k_norm, layer norms", _WHY_NORMS)),
    reference="Matches the llm preset; ComfyUI reads the decoder under model. (a bare Qwen3Model is renamed).",
    attention="self_attn.q_proj/k_proj/v_proj/o_proj",
    variant=lambda infos, root: f"Qwen3 {_size('qwen3', infos, root)}",
)


def _mistral3(infos, root):
    if _qk_norm(infos, root) or _qkv_bias(infos, root) or _gemma_norms(infos, root):
        return False
    return _with_tower(infos, root, _PIXTRAL) or _hidden(infos, root) == 5120


MISTRAL3 = _preset(
    "mistral3", "Mistral-Small 3.x (FLUX.2's text encoder): decoder linears FP8, Pixtral tower kept or dropped",
    _decoder(_mistral3),
    detection=("the llm signature without q_norm or biases, and Mistral3ForConditionalGeneration's "
               "multi_modal_projector.patch_merger beside the decoder, or a 5120-wide decoder (ComfyUI's "
               "MISTRAL3_24B rule, FLUX.2's pruned files included)"),
    quantizes=(("self_attn q/k/v/o_proj, mlp gate/up/down_proj", "as llm"),),
    keeps=(("embed_tokens", "the 131k-token lookup table"),
           ("lm_head", "ComfyUI builds none for FLUX.2 (Mistral3Small24BConfig lm_head=False): kept BF16 under "
            "transformers' names, dropped by the comfy formats (1.3 GB)"),
           ("vision_tower (Pixtral), multi_modal_projector", "ComfyUI's FLUX.2 encoder has no vision tower: "
            "kept BF16 under transformers' names (modelopt leaves towers unquantized), dropped by the comfy "
            "formats, which write what ComfyUI loads"),
           ("norms", _WHY_NORMS)),
    reference="Matches the llm preset on the decoder.",
    attention="self_attn.q_proj/k_proj/v_proj/o_proj",
    variant=lambda infos, root: f"Mistral-Small 3 {_size('mistral3', infos, root)}"
                                f"{_vision_note(infos, root, _PIXTRAL)}",
)


def _llama3(infos, root):
    if _qk_norm(infos, root) or _qkv_bias(infos, root) or _gemma_norms(infos, root):
        return False
    if _with_tower(infos, root, _LLAVA) and not _with_tower(infos, root, _PIXTRAL):
        return True
    emb = infos.get(root + "embed_tokens.weight")
    return emb is not None and len(emb.shape) == 2 and 128256 <= emb.shape[0] <= 128400


LLAMA3 = _preset(
    "llama3", "Llama 3 / LLaVA-Llama 3 (HunyuanVideo 1.0's text encoder): decoder linears FP8, CLIP tower kept or dropped",
    _decoder(_llama3),
    detection=("the llm signature without q_norm or biases, and LLaVA's multi_modal_projector.linear_1 (no "
               "patch_merger) beside the decoder, or Llama 3's 128k vocabulary (embed_tokens with 128256 to "
               "128400 rows: llava-llama-3-8b's 128320 included). A Llama of another vocabulary stays llm"),
    quantizes=(("self_attn q/k/v/o_proj, mlp gate/up/down_proj", "as llm"),),
    keeps=(("embed_tokens", "the 128k-token lookup table"),
           ("lm_head", "HunyuanVideo conditions on hidden states (layer -3); ComfyUI builds no lm_head "
            "(Llama2Config lm_head=False): kept BF16 under transformers' names, dropped by the comfy formats"),
           ("vision_tower (CLIP ViT-L), multi_modal_projector", "ComfyUI's HunyuanVideo encoder has no vision "
            "tower: kept BF16 under transformers' names, dropped by the comfy formats"),
           ("norms", _WHY_NORMS)),
    reference="Matches the llm preset on the decoder.",
    attention="self_attn.q_proj/k_proj/v_proj/o_proj",
    variant=lambda infos, root: (f"LLaVA-Llama 3 {_size('llama3', infos, root)} (with vision tower)"
                                 if _with_tower(infos, root, _LLAVA) else f"Llama 3 {_size('llama3', infos, root)}"),
)
