"""Text-encoder presets: T5, CLIP text, BERT-like encoders and decoder-only LLMs.

Each registers itself (in this order) through ``_preset``; ``ENCODERS`` in ``__init__`` also applies
their rules to the encoders bundled in an all-in-one checkpoint.
"""
from __future__ import annotations

from .base import _WHY_NORMS, K, Q, _Architecture, _mat, _preset, _Signature
from .family_encoders import _LLM_RULES, _T5_RULES  # shared with their family twins, registered before these


# ----------------------------------------------------------------------------- text encoders

T5 = _preset(
    "t5_encoder", "T5 / UMT5 / T5-XXL (FLUX, SD3, Wan text encoder): attention and wi in FP8, wo kept",
    _Architecture((
        _Signature(r"encoder\.block\.(?P<i>\d+)\.layer\.0\.SelfAttention\.q\.weight",
                   ("encoder.block.{i}.layer.1.DenseReluDense.wo.weight",),
                   lambda q, wo: _mat(q) and _mat(wo, q[1]), _T5_RULES),
    )),
    detection=("encoder.block.N.layer.0.SelfAttention.q [inner,d] with layer.1.DenseReluDense.wo [d,ff] under one "
               "prefix (text_encoders.t5xxl.transformer., text_encoder_2. ...); a decoder, if present, gets "
               "the same rules"),
    quantizes=(("SelfAttention/EncDecAttention q, k, v, o", "published T5-XXL FP8 files (ComfyUI's "
                "t5xxl_fp8_e4m3fn, Forge's) and convert-to-quant's --t5xxl preset quantize them"),
               ("DenseReluDense wi_0, wi_1 (wi)", "the gated FFN's input projections, the largest matrices")),
    keeps=(("DenseReluDense.wo", "the FFN output projection of T5 v1.1, FLAN and UMT5: its activations overflow "
            "FP16, and it is the layer whose 8-bit quantization made Flan-T5-XXL produce nonsense "
            "(huggingface/transformers#20287), which is why transformers keeps it in FP32 "
            "(_keep_in_fp32_modules = ['wo']). About 21% of T5-XXL's encoder weights"),
           ("shared / embed_tokens, relative_attention_bias", "lookup tables, not matmuls (convert-to-quant's "
            "T5-XXL preset keeps 'shared' too)"),
           ("layer_norm, final_layer_norm", _WHY_NORMS)),
    reference=("Published t5xxl_fp8_e4m3fn(_scaled) files quantize every block linear, wo included (a dump of "
               "an all-in-one FLUX FP8 file shows DenseReluDense.wo as F8_E4M3). Keeping wo costs ~1.0B "
               "parameters in BF16 for T5-XXL (~5.9 GB instead of ~4.9 GB); add "
               r"--quantize 're:.*DenseReluDense\.wo\.weight' to match those files."),
    bundled=True,
    attention='SelfAttention.q/k/v/o (and EncDecAttention in encoder-decoder checkpoints)',
)

_CLIP_HF_RULES = (   # relative to the text model (text_model., or '' as transformers 5 saves CLIPTextModel)
    (Q, r"re:encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight"),
    (Q, r"re:encoder\.layers\.\d+\.mlp\.(fc1|fc2)\.weight"),
    (K, "embeddings.*"), (K, "final_layer_norm"), (K, "../text_projection"),
)
_CLIP_OPEN_RULES = (
    (Q, r"re:transformer\.resblocks\.\d+\.attn\.out_proj\.weight"),
    (Q, r"re:transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)\.weight"),
    (K, "token_embedding"), (K, "ln_final"),
)


def _open_clip(qkv, tok, fc):          # attn.in_proj_weight [3h, h]; token_embedding [V, h]; mlp.c_fc [., h]
    h = qkv[1]
    return _mat(qkv, 3 * h, h) and _mat(tok, None, h) and _mat(fc, None, h)


CLIP_TEXT = _preset(
    "clip_text", "CLIP text encoder (CLIP-L, CLIP-G; transformers or OpenCLIP names): its layers in FP8",
    _Architecture((
        _Signature(r"encoder\.layers\.(?P<i>\d+)\.self_attn\.q_proj\.weight",
                   ("encoder.layers.{i}.mlp.fc1.weight", "embeddings.token_embedding.weight"),
                   lambda q, fc, tok: _mat(q) and _mat(fc, None, q[1]) and _mat(tok, None, q[1]), _CLIP_HF_RULES),
        _Signature(r"transformer\.resblocks\.(?P<i>\d+)\.attn\.in_proj_weight",
                   ("token_embedding.weight", "transformer.resblocks.{i}.mlp.c_fc.weight"), _open_clip,
                   _CLIP_OPEN_RULES),
    )),
    detection=("transformers names: encoder.layers.N.self_attn.q_proj with mlp.fc1 and embeddings.token_embedding "
               "[V,h] of the same width, under text_model. (or unprefixed, as transformers 5 saves CLIPTextModel); "
               "OpenCLIP names: transformer.resblocks.N.attn.in_proj_weight [3h,h] with token_embedding [V,h] "
               "under the same prefix (SDXL's conditioner.embedders.1.model., SD2's cond_stage_model.model.)"),
    quantizes=(("self_attn q/k/v/out_proj (OpenCLIP attn.out_proj)", "legacy scaled-FP8 text encoders convert "
                "every nn.Linear; CLIP's projections are ordinary, its outliers live in activations, not weights"),
               ("mlp fc1/fc2 (c_fc/c_proj)", "the bulk of the weights")),
    keeps=(("token_embedding, position_embedding (positional_embedding)", "lookup tables, not matmuls"),
           ("text_projection", "projects the pooled output that SDXL and SD3 use as their global conditioning "
            "vector: a model output head"),
           ("final_layer_norm (ln_final), layer norms, biases", _WHY_NORMS),
           ("OpenCLIP attn.in_proj_weight", "the fused q/k/v is stored as a bare parameter, not a layer weight, "
            "so the policy cannot quantize it; only attn.out_proj and the MLP become FP8 in OpenCLIP files")),
    reference=("CLIP-L and CLIP-G are mostly published in FP16 (they are small); FP8 releases follow the legacy "
               "every-nn.Linear rule, which this matches except for the kept text_projection. Vision towers "
               "(vision_model.*, visual.*) are not touched."),
    bundled=True,
    attention='self_attn.q_proj/k_proj/v_proj/out_proj',
)

_BERT_RULES = (
    (Q, r"re:encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.weight"),
    (Q, r"re:encoder\.layer\.\d+\.(attention\.output|intermediate|output)\.dense\.weight"),
    (K, "embeddings.*"), (K, "pooler.*"),
    (K, "../cls.*"), (K, "../lm_head.*"), (K, "../classifier*"), (K, "../qa_outputs"),
)

BERT = _preset(
    "bert", "BERT-like encoder (BERT, RoBERTa, MiniLM, XLM-R ...): attention and feed-forward dense layers in FP8",
    _Architecture((
        _Signature(r"encoder\.layer\.(?P<i>\d+)\.attention\.self\.query\.weight",
                   ("encoder.layer.{i}.intermediate.dense.weight", "encoder.layer.{i}.output.dense.weight"),
                   lambda q, i, o: _mat(q, q[1], q[1]) and _mat(i, None, q[1]) and _mat(o, q[1], i[0]),
                   _BERT_RULES),
    )),
    detection=("encoder.layer.N.attention.self.query [h,h] with intermediate.dense [i,h] and output.dense [h,i] "
               "under one prefix ('', bert., roberta. ...)"),
    quantizes=(("attention.self query/key/value, attention.output.dense", "llm-compressor's FP8 schemes target "
                "every Linear of the layers"),
               ("intermediate.dense, output.dense", "the bulk of the weights")),
    keeps=(("embeddings (word, position, token type)", "lookup tables; the word table is a large share of a "
            "small encoder"),
           ("pooler, task heads (cls.*, lm_head, classifier, qa_outputs)", "model outputs: a small share of the "
            "size and all of the task's decision (the MLM decoder shares the word embeddings)"),
           ("LayerNorms, biases", _WHY_NORMS)),
    reference=("No ecosystem FP8 convention for BERT-like encoders was found; this follows the generic "
               "llm-compressor recipe (every Linear in the layers, heads ignored)."),
    bundled=True,
    attention='attention.self.query/key/value, attention.output.dense',
)

LLM = _preset(
    "llm", "decoder-only LLM (Llama/Mistral/Qwen/Gemma-style, MoE too): attention and MLP/expert linears in FP8",
    _Architecture((
        _Signature(r"layers\.(?P<i>\d+)\.self_attn\.q_proj\.weight",
                   ("layers.{i}.self_attn.o_proj.weight", "layers.{i}.input_layernorm.weight"),
                   lambda q, o, ln: len(ln) == 1 and _mat(q, None, ln[0]) and _mat(o, ln[0]), _LLM_RULES),
    )),
    detection=("layers.N.self_attn.q_proj [q,h] with o_proj [h,.] and input_layernorm [h] under one prefix "
               "(model., model.language_model., text_encoders.<name>.transformer.model. ...)"),
    quantizes=(("self_attn q/k/v/o_proj", "llm-compressor's FP8 schemes and modelopt quantize every Linear of "
                "the decoder layers"),
               ("mlp gate/up/down_proj, experts and shared experts included (Mixtral w1/w2/w3)",
                "the bulk of the weights")),
    keeps=(("embed_tokens, lm_head", "input embedding and output head: kept by every FP8 recipe (llm-compressor "
            "ignores lm_head and its examples the embeddings, modelopt disables *lm_head*); quantizing "
            "embed_tokens broke a model_free_ptq model outright (logits cosine 0.22)"),
           ("MoE routers (mlp.gate, block_sparse_moe.gate, router, shared_expert_gate)", "small matrices whose "
            "error changes which experts run; modelopt disables *router* and *mlp.gate.*"),
           ("vision towers and projectors (visual, vision_tower, vision_model, multi_modal_projector, "
            "mm_projector)", "modelopt leaves them unquantized by default; their activations differ from the "
            "language model's"),
           ("norms (input_layernorm, post_attention_layernorm, q_norm/k_norm, model.norm), biases", _WHY_NORMS)),
    reference=("Matches llm-compressor's FP8 recipes (Linear targets, lm_head ignored) and modelopt's defaults; "
               "the embeddings are kept explicitly because model_free_ptq would otherwise quantize them."),
    bundled=True,
    attention='self_attn.q_proj/k_proj/v_proj/o_proj (fused qkv_proj where the model has one)',
)
