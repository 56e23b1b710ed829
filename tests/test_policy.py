"""quantkit.policy on the real key names of tiny diffusers / transformers models.

Golden files: ``tests/golden/policy_<model>.txt`` list, one per line and sorted, every key the
default ``Policy()`` quantizes. When the policy changes on purpose, regenerate them with

    QUANTKIT_UPDATE_GOLDEN=1 pytest tests/test_policy.py -k golden

and review the diff of tests/golden/ before committing it.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantkit.dtypes import BF16, BY_CODE, F8_E4M3, F32, Kind, from_torch
from quantkit.errors import PolicyError
from quantkit.policy import (DEFAULT_ACTIONS, QUANTIZABLE, Action, Decision, Policy, Rule, TensorKind,
                             classify)
from tiny_models import BUILDERS, build

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("QUANTKIT_UPDATE_GOLDEN") == "1"

Q, K, P = Action.QUANTIZE, Action.KEEP, Action.PASS
LIN, ATT, CONV, EMB, HEAD, NORM, BIAS, VEC, PARAM = (
    TensorKind.LINEAR, TensorKind.ATTENTION, TensorKind.CONV, TensorKind.EMBEDDING, TensorKind.HEAD,
    TensorKind.NORM, TensorKind.BIAS, TensorKind.VECTOR, TensorKind.PARAM)


@functools.lru_cache(maxsize=None)
def model_tensors(name: str) -> dict[str, tuple[tuple[int, ...], object]]:
    """key -> (shape, quantkit DType) of the tiny model's state_dict, in BF16 as a checkpoint would be."""
    out = {}
    for key, t in build(name).state_dict().items():
        dtype = torch.bfloat16 if t.is_floating_point() else t.dtype
        out[key] = (tuple(t.shape), from_torch(dtype))
    return out


def decide_all(name: str, policy: Policy | None = None) -> dict[str, Decision]:
    policy = policy or Policy()
    return {k: policy.decide(k, shape, dt) for k, (shape, dt) in model_tensors(name).items()}


# ----------------------------------------------------------------------------- per-key expectations

EXPECTED: dict[str, dict[str, tuple[TensorKind, Action]]] = {
    "flux": {
        "x_embedder.weight": (EMB, K),
        "context_embedder.weight": (EMB, K),
        "time_text_embed.timestep_embedder.linear_1.weight": (EMB, K),
        "time_text_embed.guidance_embedder.linear_2.weight": (EMB, K),
        "time_text_embed.text_embedder.linear_1.weight": (EMB, K),
        "transformer_blocks.0.norm1.linear.weight": (LIN, Q),          # AdaLN modulation: a linear
        "transformer_blocks.0.norm1.linear.bias": (BIAS, K),
        "transformer_blocks.0.norm1_context.linear.weight": (LIN, Q),
        "transformer_blocks.0.attn.to_q.weight": (ATT, K),
        "transformer_blocks.0.attn.to_out.0.weight": (ATT, K),
        "transformer_blocks.0.attn.add_k_proj.weight": (ATT, K),
        "transformer_blocks.0.attn.to_add_out.weight": (ATT, K),
        "transformer_blocks.0.attn.norm_q.weight": (NORM, K),
        "transformer_blocks.0.attn.norm_added_k.weight": (NORM, K),
        "transformer_blocks.0.ff.net.0.proj.weight": (LIN, Q),
        "transformer_blocks.0.ff.net.2.weight": (LIN, Q),
        "transformer_blocks.1.ff_context.net.0.proj.weight": (LIN, Q),
        "single_transformer_blocks.0.norm.linear.weight": (LIN, Q),
        "single_transformer_blocks.0.proj_mlp.weight": (LIN, Q),
        "single_transformer_blocks.1.proj_out.weight": (LIN, Q),
        "single_transformer_blocks.0.attn.to_k.weight": (ATT, K),
        "norm_out.linear.weight": (LIN, Q),
        "proj_out.weight": (LIN, Q),
        "proj_out.bias": (BIAS, K),
    },
    "flux_controlnet": {
        "controlnet_blocks.0.weight": (LIN, Q),
        "controlnet_single_blocks.0.weight": (LIN, Q),
        "controlnet_x_embedder.weight": (EMB, K),
        "controlnet_mode_embedder.weight": (EMB, K),
        "x_embedder.weight": (EMB, K),
        "transformer_blocks.0.ff.net.0.proj.weight": (LIN, Q),
        "transformer_blocks.0.attn.to_v.weight": (ATT, K),
    },
    "sd3": {
        "pos_embed.proj.weight": (EMB, K),                           # 4-D patch embedding conv
        "pos_embed.pos_embed": (PARAM, K),
        "context_embedder.weight": (EMB, K),
        "time_text_embed.text_embedder.linear_1.weight": (EMB, K),
        "transformer_blocks.0.norm1.linear.weight": (LIN, Q),
        "transformer_blocks.1.norm1_context.linear.weight": (LIN, Q),
        "transformer_blocks.0.attn.to_q.weight": (ATT, K),
        "transformer_blocks.0.attn2.to_q.weight": (ATT, K),          # SD3.5 dual attention
        "transformer_blocks.0.attn.norm_q.weight": (NORM, K),
        "transformer_blocks.0.ff.net.0.proj.weight": (LIN, Q),
        "transformer_blocks.0.ff_context.net.2.weight": (LIN, Q),
        "norm_out.linear.weight": (LIN, Q),
        "proj_out.weight": (LIN, Q),
    },
    "unet_sd15": {
        "conv_in.weight": (CONV, K),
        "time_embedding.linear_1.weight": (EMB, K),
        "down_blocks.0.attentions.0.norm.weight": (NORM, K),
        "down_blocks.0.attentions.0.proj_in.weight": (CONV, K),     # 1x1 conv in SD1.5
        "down_blocks.0.attentions.0.proj_out.weight": (CONV, K),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (ATT, K),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (ATT, K),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": (ATT, K),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (LIN, Q),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight": (LIN, Q),
        "down_blocks.0.attentions.0.transformer_blocks.0.norm3.weight": (NORM, K),
        "down_blocks.1.resnets.0.time_emb_proj.weight": (LIN, Q),
        "down_blocks.1.resnets.0.conv1.weight": (CONV, K),
        "down_blocks.1.resnets.0.conv_shortcut.weight": (CONV, K),
        "down_blocks.1.resnets.0.norm1.weight": (NORM, K),
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (LIN, Q),
        "up_blocks.0.upsamplers.0.conv.weight": (CONV, K),
        "conv_norm_out.weight": (NORM, K),
        "conv_out.weight": (CONV, K),
    },
    "unet_sdxl": {
        "down_blocks.1.attentions.0.proj_in.weight": (LIN, Q),       # linear in SDXL
        "down_blocks.1.attentions.0.proj_out.weight": (LIN, Q),
        "down_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj.weight": (LIN, Q),
        "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v.weight": (ATT, K),
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_v.weight": (ATT, K),
        "add_embedding.linear_1.weight": (EMB, K),
        "time_embedding.linear_2.weight": (EMB, K),
        "up_blocks.0.attentions.1.transformer_blocks.0.norm2.weight": (NORM, K),
    },
    "vae": {
        "encoder.mid_block.attentions.0.to_q.weight": (ATT, K),       # plural container, still attention
        "decoder.mid_block.attentions.0.to_out.0.weight": (ATT, K),
        "encoder.mid_block.attentions.0.group_norm.weight": (NORM, K),
        "encoder.conv_in.weight": (CONV, K),
        "decoder.up_blocks.0.resnets.0.conv1.weight": (CONV, K),
        "quant_conv.weight": (CONV, K),
        "post_quant_conv.weight": (CONV, K),
    },
    "qwen_image": {
        "img_in.weight": (EMB, K),                                    # input projection rule
        "txt_in.weight": (EMB, K),
        "txt_norm.weight": (NORM, K),
        "time_text_embed.timestep_embedder.linear_1.weight": (EMB, K),
        "transformer_blocks.0.img_mod.1.weight": (LIN, Q),
        "transformer_blocks.0.txt_mod.1.weight": (LIN, Q),
        "transformer_blocks.0.attn.to_q.weight": (ATT, K),
        "transformer_blocks.0.attn.add_q_proj.weight": (ATT, K),
        "transformer_blocks.0.attn.to_add_out.weight": (ATT, K),
        "transformer_blocks.0.img_mlp.net.0.proj.weight": (LIN, Q),
        "transformer_blocks.1.txt_mlp.net.2.weight": (LIN, Q),
        "norm_out.linear.weight": (LIN, Q),
        "proj_out.weight": (LIN, Q),
    },
    "flux2": {
        "time_guidance_embed.timestep_embedder.linear_1.weight": (EMB, K),
        "double_stream_modulation_img.linear.weight": (LIN, Q),
        "single_stream_modulation.linear.weight": (LIN, Q),
        "x_embedder.weight": (EMB, K),
        "context_embedder.weight": (EMB, K),
        "transformer_blocks.0.attn.to_q.weight": (ATT, K),
        "transformer_blocks.0.ff.linear_in.weight": (LIN, Q),        # in a block: not an input projection
        "transformer_blocks.0.ff_context.linear_out.weight": (LIN, Q),
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight": (LIN, Q),   # fused qkv + MLP in
        # Fused attention-out + MLP-out; its name does not say so, so it stays an attention projection.
        "single_transformer_blocks.0.attn.to_out.weight": (ATT, K),
        "norm_out.linear.weight": (LIN, Q),
        "proj_out.weight": (LIN, Q),
    },
    "wan": {
        "patch_embedding.weight": (EMB, K),                          # 5-D
        "condition_embedder.time_embedder.linear_1.weight": (EMB, K),
        "condition_embedder.time_proj.weight": (EMB, K),
        "condition_embedder.text_embedder.linear_2.weight": (EMB, K),
        "condition_embedder.image_embedder.ff.net.0.proj.weight": (EMB, K),
        "condition_embedder.image_embedder.norm1.weight": (NORM, K),
        "scale_shift_table": (PARAM, K),
        "blocks.0.scale_shift_table": (PARAM, K),
        "blocks.0.attn1.to_q.weight": (ATT, K),
        "blocks.0.attn2.add_k_proj.weight": (ATT, K),
        "blocks.0.attn2.norm_added_k.weight": (NORM, K),
        "blocks.0.norm2.weight": (NORM, K),
        "blocks.0.ffn.net.0.proj.weight": (LIN, Q),
        "blocks.1.ffn.net.2.weight": (LIN, Q),
        "proj_out.weight": (LIN, Q),
    },
    "hunyuan_video": {
        "x_embedder.proj.weight": (EMB, K),
        "context_embedder.proj_in.weight": (EMB, K),
        "context_embedder.time_text_embed.timestep_embedder.linear_1.weight": (EMB, K),
        # The token refiner is a stack of transformer blocks inside the embedder module.
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight": (ATT, K),
        "context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj.weight": (LIN, Q),
        "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear.weight": (LIN, Q),
        "context_embedder.token_refiner.refiner_blocks.0.norm1.weight": (NORM, K),
        "time_text_embed.guidance_embedder.linear_1.weight": (EMB, K),
        "transformer_blocks.0.norm1.linear.weight": (LIN, Q),
        "transformer_blocks.0.attn.add_v_proj.weight": (ATT, K),
        "single_transformer_blocks.0.proj_mlp.weight": (LIN, Q),
        "single_transformer_blocks.0.attn.to_q.weight": (ATT, K),
    },
    "clip_text": {
        "embeddings.token_embedding.weight": (EMB, K),
        "embeddings.position_embedding.weight": (EMB, K),
        "encoder.layers.0.self_attn.q_proj.weight": (ATT, K),
        "encoder.layers.0.self_attn.out_proj.weight": (ATT, K),
        "encoder.layers.0.self_attn.q_proj.bias": (BIAS, K),
        "encoder.layers.0.mlp.fc1.weight": (LIN, Q),
        "encoder.layers.1.mlp.fc2.weight": (LIN, Q),
        "encoder.layers.0.layer_norm1.weight": (NORM, K),
        "final_layer_norm.weight": (NORM, K),
    },
    "clip_text_projection": {
        "text_model.embeddings.token_embedding.weight": (EMB, K),
        "text_model.encoder.layers.0.self_attn.v_proj.weight": (ATT, K),
        "text_model.encoder.layers.0.mlp.fc1.weight": (LIN, Q),
        "text_projection.weight": (HEAD, K),
    },
    "t5_encoder": {
        "shared.weight": (EMB, K),
        "encoder.embed_tokens.weight": (EMB, K),
        "encoder.block.0.layer.0.SelfAttention.q.weight": (ATT, K),
        "encoder.block.0.layer.0.SelfAttention.k.weight": (ATT, K),
        "encoder.block.0.layer.0.SelfAttention.v.weight": (ATT, K),
        "encoder.block.1.layer.0.SelfAttention.o.weight": (ATT, K),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (EMB, K),
        "encoder.block.0.layer.0.layer_norm.weight": (NORM, K),
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (LIN, Q),
        "encoder.block.0.layer.1.DenseReluDense.wi_1.weight": (LIN, Q),
        "encoder.block.1.layer.1.DenseReluDense.wo.weight": (LIN, Q),
        "encoder.final_layer_norm.weight": (NORM, K),
    },
    "bert": {
        "embeddings.word_embeddings.weight": (EMB, K),
        "embeddings.position_embeddings.weight": (EMB, K),
        "embeddings.token_type_embeddings.weight": (EMB, K),
        "embeddings.LayerNorm.weight": (NORM, K),
        "encoder.layer.0.attention.self.query.weight": (ATT, K),
        "encoder.layer.0.attention.self.key.weight": (ATT, K),
        "encoder.layer.0.attention.self.value.weight": (ATT, K),
        "encoder.layer.0.attention.output.dense.weight": (ATT, K),
        "encoder.layer.0.attention.output.LayerNorm.weight": (NORM, K),
        "encoder.layer.0.intermediate.dense.weight": (LIN, Q),
        "encoder.layer.1.output.dense.weight": (LIN, Q),
        "encoder.layer.1.output.LayerNorm.weight": (NORM, K),
        "pooler.dense.weight": (HEAD, K),
    },
    "llama": {
        "model.embed_tokens.weight": (EMB, K),
        "model.layers.0.self_attn.q_proj.weight": (ATT, K),
        "model.layers.0.self_attn.k_proj.weight": (ATT, K),
        "model.layers.0.self_attn.v_proj.weight": (ATT, K),
        "model.layers.1.self_attn.o_proj.weight": (ATT, K),
        "model.layers.0.mlp.gate_proj.weight": (LIN, Q),
        "model.layers.0.mlp.up_proj.weight": (LIN, Q),
        "model.layers.1.mlp.down_proj.weight": (LIN, Q),
        "model.layers.0.input_layernorm.weight": (NORM, K),
        "model.layers.0.post_attention_layernorm.weight": (NORM, K),
        "model.norm.weight": (NORM, K),
        "lm_head.weight": (HEAD, K),
    },
    "gpt2": {
        "transformer.wte.weight": (EMB, K),
        "transformer.wpe.weight": (EMB, K),
        "transformer.h.0.ln_1.weight": (NORM, K),
        # Conv1D stores [in, out]; c_attn is the fused qkv projection of the attention module.
        "transformer.h.0.attn.c_attn.weight": (ATT, K),
        "transformer.h.0.attn.c_proj.weight": (ATT, K),
        "transformer.h.0.mlp.c_fc.weight": (LIN, Q),
        "transformer.h.1.mlp.c_proj.weight": (LIN, Q),
        "transformer.ln_f.weight": (NORM, K),
        "lm_head.weight": (HEAD, K),                                  # tied to wte
    },
}


def test_every_model_has_expectations():
    assert set(EXPECTED) == set(BUILDERS)


@pytest.mark.parametrize("model", sorted(BUILDERS))
def test_representative_keys(model):
    decisions = decide_all(model)
    missing = sorted(set(EXPECTED[model]) - set(decisions))
    assert not missing, f"{model}: keys not in the model (diffusers/transformers renamed them?): {missing}"
    wrong = {key: (d.kind, d.action) for key, d in decisions.items()
             if key in EXPECTED[model] and (d.kind, d.action) != EXPECTED[model][key]}
    assert not wrong, "\n".join(f"{k}: got {g}, expected {EXPECTED[model][k]}" for k, g in wrong.items())


@pytest.mark.parametrize("model", sorted(BUILDERS))
def test_model_invariants(model):
    tensors = model_tensors(model)
    decisions = decide_all(model)
    for key, d in decisions.items():
        shape, dtype = tensors[key]
        if d.action is Q:
            assert d.kind is LIN and len(shape) == 2 and key.endswith(".weight"), key
        if len(shape) <= 1 or key.endswith(".bias"):
            assert d.action is K, key
        if dtype.kind is not Kind.FLOAT:
            assert d.action is P, key
        if d.kind is CONV:
            assert len(shape) >= 3, key
        assert d.rule is None and d.reason
    n_q = sum(d.action is Q for d in decisions.values())
    if model == "vae":
        assert n_q == 0          # convolutions and attention only
    else:
        assert n_q > 0


@pytest.mark.parametrize("model", sorted(BUILDERS))
def test_quantize_conv_adds_exactly_the_convolutions(model):
    default, with_conv = decide_all(model), decide_all(model, Policy(quantize_conv=True))
    changed = {k for k in default if default[k].action != with_conv[k].action}
    assert changed == {k for k, d in default.items() if d.kind is CONV}
    assert all(with_conv[k].action is Q for k in changed)


# ----------------------------------------------------------------------------- golden summaries

def quantized_keys(model: str) -> list[str]:
    return sorted(k for k, d in decide_all(model).items() if d.action is Q)


@pytest.mark.parametrize("model", sorted(BUILDERS))
def test_golden_quantized_keys(model):
    path = GOLDEN_DIR / f"policy_{model}.txt"
    got = quantized_keys(model)
    text = "".join(k + "\n" for k in got)
    if UPDATE_GOLDEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(text)
        return
    how = ("if the policy changed on purpose, regenerate with "
           "QUANTKIT_UPDATE_GOLDEN=1 pytest tests/test_policy.py -k golden, then review the diff")
    assert path.exists(), f"missing golden file {path}; {how}"
    want = path.read_text().splitlines()
    added, removed = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    assert got == want, (f"{model}: default policy now also quantizes {added} and no longer quantizes "
                         f"{removed}; {how}")


# ----------------------------------------------------------------------------- hand-written key lists

# BFL / ComfyUI FLUX.1-dev names (not built by diffusers), real shapes, and the diffusers twin of each
# (None where there is no one-to-one twin: linear1 fuses to_q/to_k/to_v and proj_mlp).
BFL_FLUX = [
    ("img_in.weight", (3072, 64), EMB, K, "x_embedder.weight"),
    ("img_in.bias", (3072,), BIAS, K, "x_embedder.bias"),
    ("txt_in.weight", (3072, 4096), EMB, K, "context_embedder.weight"),
    ("time_in.in_layer.weight", (3072, 256), EMB, K, "time_text_embed.timestep_embedder.linear_1.weight"),
    ("time_in.out_layer.weight", (3072, 3072), EMB, K, "time_text_embed.timestep_embedder.linear_2.weight"),
    ("vector_in.in_layer.weight", (3072, 768), EMB, K, "time_text_embed.text_embedder.linear_1.weight"),
    ("vector_in.out_layer.weight", (3072, 3072), EMB, K, "time_text_embed.text_embedder.linear_2.weight"),
    ("guidance_in.in_layer.weight", (3072, 256), EMB, K, "time_text_embed.guidance_embedder.linear_1.weight"),
    ("guidance_in.out_layer.weight", (3072, 3072), EMB, K, "time_text_embed.guidance_embedder.linear_2.weight"),
    ("double_blocks.0.img_mod.lin.weight", (18432, 3072), LIN, Q, "transformer_blocks.0.norm1.linear.weight"),
    ("double_blocks.0.txt_mod.lin.weight", (18432, 3072), LIN, Q,
     "transformer_blocks.0.norm1_context.linear.weight"),
    ("double_blocks.0.img_attn.qkv.weight", (9216, 3072), ATT, K, "transformer_blocks.0.attn.to_q.weight"),
    ("double_blocks.0.img_attn.qkv.bias", (9216,), BIAS, K, "transformer_blocks.0.attn.to_q.bias"),
    ("double_blocks.0.img_attn.proj.weight", (3072, 3072), ATT, K, "transformer_blocks.0.attn.to_out.0.weight"),
    ("double_blocks.0.img_attn.norm.query_norm.scale", (128,), NORM, K, "transformer_blocks.0.attn.norm_q.weight"),
    ("double_blocks.0.img_attn.norm.key_norm.scale", (128,), NORM, K, "transformer_blocks.0.attn.norm_k.weight"),
    ("double_blocks.0.txt_attn.qkv.weight", (9216, 3072), ATT, K, "transformer_blocks.0.attn.add_q_proj.weight"),
    ("double_blocks.0.txt_attn.proj.weight", (3072, 3072), ATT, K, "transformer_blocks.0.attn.to_add_out.weight"),
    ("double_blocks.0.img_mlp.0.weight", (12288, 3072), LIN, Q, "transformer_blocks.0.ff.net.0.proj.weight"),
    ("double_blocks.0.img_mlp.2.weight", (3072, 12288), LIN, Q, "transformer_blocks.0.ff.net.2.weight"),
    ("double_blocks.0.txt_mlp.0.weight", (12288, 3072), LIN, Q, "transformer_blocks.0.ff_context.net.0.proj.weight"),
    ("double_blocks.0.txt_mlp.2.weight", (3072, 12288), LIN, Q, "transformer_blocks.0.ff_context.net.2.weight"),
    ("single_blocks.0.linear1.weight", (21504, 3072), LIN, Q, None),
    ("single_blocks.0.linear2.weight", (3072, 15360), LIN, Q, "single_transformer_blocks.0.proj_out.weight"),
    ("single_blocks.0.modulation.lin.weight", (9216, 3072), LIN, Q, "single_transformer_blocks.0.norm.linear.weight"),
    ("single_blocks.0.norm.query_norm.scale", (128,), NORM, K, "single_transformer_blocks.0.attn.norm_q.weight"),
    ("final_layer.linear.weight", (64, 3072), LIN, Q, "proj_out.weight"),
    ("final_layer.adaLN_modulation.1.weight", (6144, 3072), LIN, Q, "norm_out.linear.weight"),
]


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("key,shape,kind,action,twin", BFL_FLUX, ids=[r[0] for r in BFL_FLUX])
def test_bfl_flux_names(prefix, key, shape, kind, action, twin):
    d = Policy().decide(prefix + key, shape, BF16)
    assert (d.kind, d.action) == (kind, action)


@pytest.mark.parametrize("key,shape,kind,action,twin", [r for r in BFL_FLUX if r[4]], ids=[r[0] for r in BFL_FLUX if r[4]])
def test_bfl_and_diffusers_flux_agree(key, shape, kind, action, twin):
    """The same FLUX layer gets the same action whichever naming the checkpoint uses."""
    twin_shape, twin_dtype = model_tensors("flux")[twin]
    assert Policy().decide(twin, twin_shape, twin_dtype).action is action


# Original (LDM / ComfyUI single-file) Stable Diffusion names, and other keys the tiny models lack.
LDM_AND_OTHERS = [
    ("model.diffusion_model.input_blocks.0.0.weight", (320, 4, 3, 3), BF16, CONV, K),
    ("model.diffusion_model.time_embed.0.weight", (1280, 320), BF16, EMB, K),
    ("model.diffusion_model.label_emb.0.0.weight", (1280, 2816), BF16, EMB, K),
    ("model.diffusion_model.input_blocks.1.0.emb_layers.1.weight", (320, 1280), BF16, LIN, Q),
    ("model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320, 1, 1), BF16, CONV, K),
    ("model.diffusion_model.input_blocks.4.1.proj_in.weight", (640, 640), BF16, LIN, Q),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (320, 320), BF16, ATT, K),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", (2560, 320), BF16, LIN, Q),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.weight", (320,), BF16, NORM, K),
    ("model.diffusion_model.out.2.weight", (4, 320, 3, 3), BF16, CONV, K),
    # SDXL: the text encoders live in a numbered list of "embedders"; their layers are ordinary layers.
    ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", (49408, 768), BF16, EMB, K),
    ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", (3072, 768), BF16, LIN, Q),
    ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight", (768, 768), BF16,
     ATT, K),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", (3840, 1280), BF16, PARAM, K),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight", (1280, 1280), BF16, ATT, K),
    ("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight", (5120, 1280), BF16, LIN, Q),
    ("conditioner.embedders.1.model.text_projection", (1280, 1280), BF16, PARAM, K),
    ("first_stage_model.decoder.mid.attn_1.q.weight", (512, 512, 1, 1), BF16, CONV, K),
    ("first_stage_model.decoder.mid.attn_1.q.weight", (512, 512), BF16, ATT, K),        # attn_N module
    # Original (non-diffusers) HunyuanVideo names: the attention token is in the layer's own name.
    ("double_blocks.0.img_attn_qkv.weight", (9216, 3072), BF16, ATT, K),
    ("double_blocks.0.img_attn_proj.weight", (3072, 3072), BF16, ATT, K),
    ("double_blocks.0.img_mlp.fc1.weight", (12288, 3072), BF16, LIN, Q),
    ("double_blocks.0.img_mod.linear.weight", (18432, 3072), BF16, LIN, Q),
    ("txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight", (9216, 3072), BF16, ATT, K),
    ("txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight", (12288, 3072), BF16, LIN, Q),
    ("txt_in.input_embedder.weight", (3072, 4096), BF16, EMB, K),
    ("txt_in.t_embedder.mlp.0.weight", (3072, 256), BF16, EMB, K),
    ("single_blocks.0.linear1.weight", (27648, 3072), BF16, LIN, Q),
    # Non-float and already-FP8 tensors pass through whatever their name.
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", (1, 77), BY_CODE["I64"], TensorKind.NONFLOAT, P),
    ("text_model.embeddings.position_ids", (1, 77), BY_CODE["I64"], TensorKind.NONFLOAT, P),
    ("transformer_blocks.0.ff.net.2.weight", (64, 256), F8_E4M3, TensorKind.FP8, P),
    ("encoder.layer.0.attention.self.query.weight", (32, 32), BY_CODE["BOOL"], TensorKind.NONFLOAT, P),
    # Scalars and other 1-D parameters.
    ("logit_scale", (), F32, VEC, K),
    ("embeddings.class_embedding", (768,), F32, VEC, K),
    # Heads.
    ("classifier.dense.weight", (768, 768), BF16, HEAD, K),
    ("score.weight", (2, 768), BF16, HEAD, K),
    # Top-level input projection (LTX-Video), an in-block *_in stays a linear.
    ("proj_in.weight", (2048, 128), BF16, EMB, K),
    ("blocks.0.mlp.fc_in.weight", (4096, 1024), BF16, LIN, Q),
]


@pytest.mark.parametrize("key,shape,dtype,kind,action", LDM_AND_OTHERS, ids=[r[0] for r in LDM_AND_OTHERS])
def test_hand_written_keys(key, shape, dtype, kind, action):
    d = Policy().decide(key, shape, dtype)
    assert (d.kind, d.action) == (kind, action), d.reason


# ----------------------------------------------------------------------------- rules

FF = "transformer_blocks.0.ff.net.0.proj.weight"
TO_Q = "transformer_blocks.0.attn.to_q.weight"
TO_K = "transformer_blocks.0.attn.to_k.weight"
NORM_Q = "transformer_blocks.0.attn.norm_q.weight"
BIAS_KEY = "transformer_blocks.0.ff.net.0.proj.bias"
M2, V1 = (128, 32), (32,)


def test_default_actions_table():
    assert DEFAULT_ACTIONS[LIN] is Q and DEFAULT_ACTIONS[CONV] is K
    assert QUANTIZABLE == {LIN, ATT, CONV, EMB, HEAD}
    assert classify(FF, M2, BF16) is LIN


def test_keep_glob_overrides_linear():
    rule = Rule(K, "*.ff.*")
    d = Policy(rules=(rule,)).decide(FF, M2, BF16)
    assert (d.action, d.kind, d.rule) == (K, LIN, rule)
    assert "--keep" in d.reason and "*.ff.*" in d.reason


def test_glob_matches_layer_name_and_crosses_dots():
    assert Rule(K, "transformer_blocks.0.ff.net.0.proj").matches(FF)         # layer name, no .weight
    assert Rule(K, "transformer_blocks.*.proj").matches(FF)                  # * crosses dots
    assert Rule(K, FF).matches(FF)                                           # the whole key
    assert not Rule(K, "ff.net.0.proj").matches(FF)                          # globs are anchored
    assert not Rule(K, "transformer_blocks.1.*").matches(FF)


def test_regex_rules_match_in_full():
    assert Rule(Q, r"re:transformer_blocks\.\d+\.attn\.to_[qkv]").matches(TO_Q)
    assert Rule(Q, r"re:transformer_blocks\.\d+\.attn\.to_[qkv]\.weight").matches(TO_Q)
    assert not Rule(Q, "re:attn").matches(TO_Q)                              # fullmatch, not search
    assert Rule(Q, "re:.*attn.*").matches(TO_Q)


def test_quantize_rule_on_attention():
    d = Policy(rules=(Rule(Q, r"re:.*\.attn\.to_[qkv]"),)).decide(TO_Q, M2, BF16)
    assert (d.action, d.kind) == (Q, ATT)


def test_quantize_rule_on_embedding_head_and_conv():
    p = Policy(rules=(Rule(Q, "*"),))
    assert p.decide("x_embedder.weight", (32, 16), BF16).action is Q
    assert p.decide("lm_head.weight", (1000, 32), BF16).action is Q
    assert p.decide("conv_in.weight", (32, 4, 3, 3), BF16).action is Q


def test_last_rule_wins():
    rules = (Rule(Q, "*.attn.*"), Rule(K, "*.to_q"))
    p = Policy(rules=rules)
    assert p.decide(TO_Q, M2, BF16).action is K
    assert p.decide(TO_K, M2, BF16).action is Q
    p = Policy(rules=tuple(reversed(rules)))
    d = p.decide(TO_Q, M2, BF16)
    assert (d.action, d.rule) == (Q, rules[0])


@pytest.mark.parametrize("key,shape,kind", [
    (NORM_Q, V1, NORM), (BIAS_KEY, (128,), BIAS), ("logit_scale", (), VEC), ("pos_embed.pos_embed", (1, 256, 32), PARAM),
])
def test_quantize_rule_refused_on_non_matrices(key, shape, kind):
    rule = Rule(Q, "*")
    d = Policy(rules=(rule,)).decide(key, shape, BF16)
    assert (d.action, d.kind, d.rule) == (K, kind, rule)
    assert "cannot quantize" in d.reason


def test_keep_after_refused_quantize_is_a_plain_keep():
    d = Policy(rules=(Rule(Q, "*"), Rule(K, "*.norm_q"))).decide(NORM_Q, V1, BF16)
    assert d.action is K and "cannot" not in d.reason


@pytest.mark.parametrize("dtype", [d for d in BY_CODE.values() if d.kind is not Kind.FLOAT], ids=lambda d: d.code)
def test_non_float_always_passes(dtype):
    for rules in [(), (Rule(Q, "*"),), (Rule(K, "*"),), (Rule(Q, "*"), Rule(K, "*"))]:
        for shape in [(), (7,), (32, 32), (4, 4, 3, 3)]:
            d = Policy(rules=rules, quantize_conv=True).decide(FF, shape, dtype)
            assert d.action is P and d.rule is None


def test_unused_rules():
    names = list(model_tensors("flux"))
    used_q, used_k = Rule(Q, "*.attn.to_q"), Rule(K, "re:proj_out\\..*")
    typo, typo_re = Rule(K, "*.atn.*"), Rule(Q, "re:transformer_block\\..*")
    p = Policy(rules=(used_q, typo, used_k, typo_re))
    assert p.unused_rules(names) == [typo, typo_re]
    assert Policy().unused_rules(names) == []


@pytest.mark.parametrize("pattern", ["re:(", "re:[a-", "re:*x", "re:a{2,1}"])
def test_bad_regex_raises(pattern):
    with pytest.raises(PolicyError, match="regular expression"):
        Rule(Q, pattern)


def test_empty_pattern_raises():
    with pytest.raises(PolicyError):
        Rule(K, "")


def test_pass_rule_raises():
    with pytest.raises(PolicyError):
        Rule(Action.PASS, "*")


def test_describe_and_json():
    p = Policy(rules=(Rule(Q, "*.attn.*"), Rule(K, "re:.*to_q")), quantize_conv=True, name="custom")
    desc = p.describe()
    assert desc["rules"] == [["quantize", "*.attn.*"], ["keep", "re:.*to_q"]]
    assert desc["defaults"]["convolution"] == "quantize" and desc["name"] == "custom"
    assert json.loads(p.to_json()) == desc
    assert p.to_json() == Policy(rules=p.rules, quantize_conv=True, name="custom").to_json()
    assert Policy().describe()["defaults"]["convolution"] == "keep"


# ----------------------------------------------------------------------------- property tests

_SEGMENTS = ["transformer_blocks", "single_transformer_blocks", "attn", "attn1", "attn2", "attentions", "to_q",
             "to_out", "ff", "net", "proj", "norm", "norm1", "linear", "embed", "x_embedder", "time_text_embed",
             "img_in", "proj_in", "proj_out", "lm_head", "pooler", "self_attn", "mlp", "fc1", "layers", "blocks",
             "SelfAttention", "relative_attention_bias", "label_emb", "conv", "resnets", "model", "encoder",
             "to_qkv_mlp_proj", "layer_norm", "ln_f", "wte", "shared", "q_proj", "query", "dense"]
segment = st.one_of(st.sampled_from(_SEGMENTS), st.integers(0, 12).map(str),
                    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True))
leaf = st.one_of(st.sampled_from(["weight", "bias", "scale", "running_mean", "pos_embed", "in_proj_weight"]),
                 st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True))
key = st.builds(lambda segs, lf: ".".join(segs + [lf]), st.lists(segment, max_size=7), leaf)
shape = st.lists(st.integers(1, 4096), max_size=5).map(tuple)
dtype = st.sampled_from(sorted(BY_CODE.values(), key=lambda d: d.code))


@given(key, shape, dtype)
def test_default_never_raises_and_never_quantizes_vectors(name, shp, dt):
    d = Policy().decide(name, shp, dt)
    assert d.kind is classify(name, shp, dt)
    if dt.kind is not Kind.FLOAT:
        assert d.action is P
    elif name.rsplit(".", 1)[-1] == "bias" or len(shp) <= 1:
        assert d.action is K
    if d.action is Q:
        assert d.kind is LIN and len(shp) == 2


@given(key, shape, dtype, st.booleans())
def test_quantize_everything_rule_respects_quantizable(name, shp, dt, conv):
    d = Policy(rules=(Rule(Q, "*"),), quantize_conv=conv).decide(name, shp, dt)
    if d.action is Q:
        assert d.kind in QUANTIZABLE and len(shp) >= 2 and dt.kind is Kind.FLOAT
    if name.rsplit(".", 1)[-1] == "bias" or len(shp) <= 1:
        assert d.action is not Q
