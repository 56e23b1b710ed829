"""Architecture presets (quantkit.presets): detection from keys and shapes, the decisions each preset
makes on real key names, and the presets end to end through the CLI.

Golden files: ``tests/golden/preset_<model>.txt`` list, one per line and sorted, every key that
``--preset auto`` quantizes in the tiny model ``<model>`` (``preset_flux_bfl.txt``: the hand-written
BFL/ComfyUI FLUX.1-dev key list below). When a preset changes on purpose, regenerate them with

    QUANTKIT_UPDATE_GOLDEN=1 pytest tests/test_presets.py -k golden

and review the diff of tests/golden/ before committing it.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import re

import pytest
import torch
from safetensors import safe_open

from quantkit.dtypes import BF16, from_torch
from quantkit.errors import PolicyError
from quantkit.plan import ConvertOptions, Recipe
from quantkit.policy import Action, Policy, Rule, TensorKind
from quantkit.presets import (ENCODERS, GENERIC, KEEP_MODULATION_BFL, KEEP_MODULATION_DIFFUSERS,
                              KEEP_MODULATION_MMDIT, REGISTRY, resolve)
from quantkit.quantize import convert
from quantkit.reader import TensorInfo
from quantkit.readback import load_dequantized
from runs import run

from tiny_models import build, forward, save_state_dict, tiny_qwen2_moe, without_zero_layers

ROOT = pathlib.Path(__file__).parent
GOLDEN_DIR = ROOT / "golden"
UPDATE_GOLDEN = os.environ.get("QUANTKIT_UPDATE_GOLDEN") == "1"
Q, K = Action.QUANTIZE, Action.KEEP

# tiny model (tests/tiny_models.py BUILDERS) -> the preset `auto` must pick for it
MODELS = {
    "flux": "flux", "flux_controlnet": "flux_controlnet", "sd3": "sd3", "qwen_image": "qwen_image",
    "unet_sd15": "unet", "unet_sdxl": "unet", "clip_text": "clip_text", "clip_text_projection": "clip_text",
    "t5_encoder": "t5_encoder", "bert": "bert", "llama": "llm",
}
# Architectures without a preset: `auto` must leave them to the generic policy.
UNKNOWN = ["gpt2", "vae", "flux2", "wan", "hunyuan_video"]
PREFIXES = ["", "model.diffusion_model.", "transformer.", "text_encoders.clip_l.transformer."]


# ----------------------------------------------------------------------------- helpers

def info(name: str, shape, dtype=BF16) -> TensorInfo:
    return TensorInfo(name, dtype, tuple(shape), 0, 0)


@functools.lru_cache(maxsize=None)
def _model_infos(model: str) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    out = []
    for key, t in build(model).state_dict().items():
        out.append((key, tuple(t.shape), "BF16" if t.is_floating_point() else str(t.dtype)))
    return tuple(out)


def model_infos(model: str, prefix: str = "") -> dict[str, TensorInfo]:
    """key -> TensorInfo of the tiny model's state dict as a BF16 checkpoint would hold it, keys prefixed."""
    out = {}
    for key, shape, dt in _model_infos(model):
        dtype = BF16 if dt == "BF16" else from_torch(getattr(torch, dt.split(".")[-1]))
        out[prefix + key] = info(prefix + key, shape, dtype)
    return out


def decisions(infos: dict, preset: str = "auto", policy: Policy | None = None):
    p, note = resolve(preset, infos)
    policy = (policy or Policy()).with_preset(p.name, p.rules(infos))
    return p, note, {k: policy.decide(k, i.shape, i.dtype) for k, i in infos.items()}


def quantized(infos: dict, preset: str = "auto") -> list[str]:
    return sorted(k for k, d in decisions(infos, preset)[2].items() if d.action is Q)


def check_golden(name: str, got: list[str]) -> None:
    path = GOLDEN_DIR / f"preset_{name}.txt"
    text = "".join(k + "\n" for k in got)
    if UPDATE_GOLDEN:
        path.write_text(text)
        return
    how = ("if the preset changed on purpose, regenerate with "
           "QUANTKIT_UPDATE_GOLDEN=1 pytest tests/test_presets.py -k golden")
    assert path.exists(), f"missing golden file {path}; {how}"
    want = path.read_text().splitlines()
    added, removed = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    assert got == want, f"{name}: now also quantizes {added}, no longer quantizes {removed}; {how}"



# ----------------------------------------------------------------------------- hand-written key lists

def bfl_flux(prefix: str = "", double: int = 19, single: int = 38) -> dict[str, TensorInfo]:
    """FLUX.1-dev as BFL / ComfyUI name it, with its real shapes (h 3072, mlp 12288, head dim 128)."""
    h, mlp = 3072, 12288
    shapes = {"img_in": (h, 64), "txt_in": (h, 4096), "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
              "vector_in.in_layer": (h, 768), "vector_in.out_layer": (h, h), "guidance_in.in_layer": (h, 256),
              "guidance_in.out_layer": (h, h), "final_layer.linear": (64, h),
              "final_layer.adaLN_modulation.1": (2 * h, h)}
    for n in range(double):
        for s in ("img", "txt"):
            b = f"double_blocks.{n}.{s}_"
            shapes.update({b + "mod.lin": (6 * h, h), b + "attn.qkv": (3 * h, h), b + "attn.proj": (h, h),
                           b + "mlp.0": (mlp, h), b + "mlp.2": (h, mlp)})
    for n in range(single):
        b = f"single_blocks.{n}."
        shapes.update({b + "linear1": (3 * h + mlp, h), b + "linear2": (h, h + mlp),
                       b + "modulation.lin": (3 * h, h)})
    out = {}
    for layer, shape in shapes.items():
        out[prefix + layer + ".weight"] = info(prefix + layer + ".weight", shape)
        out[prefix + layer + ".bias"] = info(prefix + layer + ".bias", shape[:1])
    for n in range(double):
        for s in ("img", "txt"):
            for q in ("query_norm", "key_norm"):
                k = f"{prefix}double_blocks.{n}.{s}_attn.norm.{q}.scale"
                out[k] = info(k, (128,))
    for n in range(single):
        for q in ("query_norm", "key_norm"):
            k = f"{prefix}single_blocks.{n}.norm.{q}.scale"
            out[k] = info(k, (128,))
    return out


def from_shapes(shapes: dict[str, tuple], prefix: str = "") -> dict[str, TensorInfo]:
    return {prefix + k: info(prefix + k, s) for k, s in shapes.items()}


# SD3.5-medium-like MMDiT under ComfyUI/SAI names (h 1536): dual attention in block 0, block 2 is the last
# one (context_pre_only: its context block has only q/k/v and a 2h modulation).
H3 = 1536
MMDIT = {
    "x_embedder.proj.weight": (H3, 16, 2, 2), "pos_embed": (1, 36864, H3), "context_embedder.weight": (H3, 4096),
    "t_embedder.mlp.0.weight": (H3, 256), "t_embedder.mlp.2.weight": (H3, H3), "y_embedder.mlp.0.weight": (H3, 2048),
    "y_embedder.mlp.2.weight": (H3, H3), "final_layer.linear.weight": (64, H3),
    "final_layer.adaLN_modulation.1.weight": (2 * H3, H3),
    **{f"joint_blocks.{n}.x_block.{k}": s for n in range(3) for k, s in {
        "attn.qkv.weight": (3 * H3, H3), "attn.proj.weight": (H3, H3), "attn.ln_q.weight": (64,),
        "mlp.fc1.weight": (4 * H3, H3), "mlp.fc2.weight": (H3, 4 * H3),
        "adaLN_modulation.1.weight": ((9 if n == 0 else 6) * H3, H3)}.items()},
    "joint_blocks.0.x_block.attn2.qkv.weight": (3 * H3, H3), "joint_blocks.0.x_block.attn2.proj.weight": (H3, H3),
    **{f"joint_blocks.{n}.context_block.{k}": s for n in range(2) for k, s in {
        "attn.qkv.weight": (3 * H3, H3), "attn.proj.weight": (H3, H3), "mlp.fc1.weight": (4 * H3, H3),
        "mlp.fc2.weight": (H3, 4 * H3), "adaLN_modulation.1.weight": (6 * H3, H3)}.items()},
    "joint_blocks.2.context_block.attn.qkv.weight": (3 * H3, H3),
    "joint_blocks.2.context_block.adaLN_modulation.1.weight": (2 * H3, H3),
}

# SD1.5 / SDXL as LDM (single-file, ComfyUI) names.
LDM_UNET = {
    "time_embed.0.weight": (1280, 320), "time_embed.2.weight": (1280, 1280), "label_emb.0.0.weight": (1280, 2816),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (320, 1280), "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "input_blocks.1.1.proj_in.weight": (320, 320), "input_blocks.1.1.proj_out.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 2048),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "input_blocks.1.1.transformer_blocks.0.norm1.weight": (320,),
    "middle_block.1.transformer_blocks.0.attn1.to_v.weight": (1280, 1280),
    "middle_block.1.proj_out.weight": (1280, 1280), "middle_block.0.emb_layers.1.weight": (1280, 1280),
    "output_blocks.2.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "out.2.weight": (4, 320, 3, 3),
}

# SDXL's CLIP-G as OpenCLIP names (conditioner.embedders.1.model.).
OPEN_CLIP = {
    "token_embedding.weight": (49408, 1280), "positional_embedding": (77, 1280), "ln_final.weight": (1280,),
    "text_projection": (1280, 1280), "transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    "transformer.resblocks.0.attn.in_proj_bias": (3840,),
    "transformer.resblocks.0.attn.out_proj.weight": (1280, 1280),
    "transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
    "transformer.resblocks.0.mlp.c_proj.weight": (1280, 5120),
    "transformer.resblocks.0.ln_1.weight": (1280,),
}

# XLabs FLUX ControlNet (BFL names, two double blocks).
XLABS = {
    **{k: i.shape for k, i in bfl_flux(double=2, single=0).items() if not k.startswith("final_layer")},
    "controlnet_blocks.0.weight": (3072, 3072), "controlnet_blocks.0.bias": (3072,),
    "controlnet_blocks.1.weight": (3072, 3072), "pos_embed_input.weight": (3072, 64),
    "input_hint_block.0.weight": (16, 3, 3, 3), "input_hint_block.14.weight": (16, 16, 3, 3),
}

# MoE LLMs as stored on the Hub (per-expert weights), and a VLM.
MOE_HUB = {
    "model.embed_tokens.weight": (32000, 4096), "lm_head.weight": (32000, 4096),
    "model.layers.0.input_layernorm.weight": (4096,),
    "model.layers.0.self_attn.q_proj.weight": (4096, 4096), "model.layers.0.self_attn.o_proj.weight": (4096, 4096),
    "model.layers.0.block_sparse_moe.gate.weight": (8, 4096),
    "model.layers.0.block_sparse_moe.experts.0.w1.weight": (14336, 4096),
    "model.layers.0.block_sparse_moe.experts.7.w2.weight": (4096, 14336),
    "model.layers.1.mlp.gate.weight": (60, 4096), "model.layers.1.mlp.experts.59.up_proj.weight": (1408, 4096),
    "model.layers.1.mlp.shared_expert.down_proj.weight": (4096, 5632),
    "model.layers.1.mlp.shared_expert_gate.weight": (1, 4096),
    "model.visual.blocks.0.attn.qkv.weight": (3840, 1280), "model.visual.blocks.0.mlp.gate_proj.weight": (3420, 1280),
    "model.visual.merger.mlp.0.weight": (5120, 5120),
}

# T5 with its decoder (T5ForConditionalGeneration) and a BERT MLM with its heads.
T5_FULL = {
    "shared.weight": (32128, 512), "encoder.block.0.layer.0.SelfAttention.q.weight": (384, 512),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 6),
    "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (1024, 512),
    "encoder.block.0.layer.1.DenseReluDense.wo.weight": (512, 1024),
    "decoder.block.0.layer.1.EncDecAttention.k.weight": (384, 512),
    "decoder.block.0.layer.2.DenseReluDense.wi_1.weight": (1024, 512),
    "decoder.block.0.layer.2.DenseReluDense.wo.weight": (512, 1024), "lm_head.weight": (32128, 512),
}
BERT_MLM = {
    "bert.embeddings.word_embeddings.weight": (30522, 768),
    "bert.encoder.layer.0.attention.self.query.weight": (768, 768),
    "bert.encoder.layer.0.attention.output.dense.weight": (768, 768),
    "bert.encoder.layer.0.intermediate.dense.weight": (3072, 768),
    "bert.encoder.layer.0.output.dense.weight": (768, 3072),
    "cls.predictions.transform.dense.weight": (768, 768), "cls.predictions.decoder.weight": (30522, 768),
    "cls.seq_relationship.weight": (2, 768),
}


# ----------------------------------------------------------------------------- the registry

def test_registry_lists_every_preset_with_documentation():
    assert list(REGISTRY)[0] == "generic" and REGISTRY["generic"] is GENERIC
    assert set(REGISTRY) >= {"generic", *MODELS.values()}   # the other families: tests/test_families.py
    for name, p in REGISTRY.items():
        assert p.name == name and p.summary and p.detection
        assert p.keeps and all(what and why for what, why in p.keeps)
        if p is not GENERIC:
            assert p.reference and p.quantizes and all(what and why for what, why in p.quantizes)
    assert {p.name for p in ENCODERS} == {"t5_encoder", "clip_text", "bert", "llm"}


def test_docs_have_a_section_per_preset():
    text = (ROOT.parent / "docs" / "presets.md").read_text()
    for name in REGISTRY:
        assert re.search(rf"^## `{name}`", text, re.M), f"docs/presets.md has no section for {name}"


# ----------------------------------------------------------------------------- detection

@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_auto_detects_the_architecture(model, prefix):
    infos = model_infos(model, prefix)
    preset, note = resolve("auto", infos)
    assert preset.name == MODELS[model], note
    assert note.startswith(f"preset {preset.name} (detected")
    assert all(root.startswith(prefix) for root in preset.locate(infos))


@pytest.mark.parametrize("model", UNKNOWN)
def test_auto_leaves_unknown_architectures_to_the_generic_policy(model):
    preset, note = resolve("auto", model_infos(model))
    assert preset is GENERIC and preset.rules(model_infos(model)) == ()
    assert note == "preset generic (no known architecture detected)"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_flux_is_detected_from_names_and_shapes(prefix):
    infos = bfl_flux(prefix)
    assert resolve("auto", infos)[0].name == "flux"
    assert REGISTRY["flux"].locate(infos) == (prefix,)
    # One double block or one single block is enough (e.g. a shard of a split file) ...
    assert resolve("auto", bfl_flux(prefix, double=1, single=0))[0].name == "flux"
    assert resolve("auto", bfl_flux(prefix, double=0, single=1))[0].name == "flux"


def test_look_alike_names_with_wrong_shapes_are_not_flux():
    infos = bfl_flux(double=1, single=0)
    key = "double_blocks.0.img_mod.lin.weight"
    infos[key] = info(key, (5 * 3072, 3072))              # not [6h, h]
    assert resolve("auto", infos)[0] is GENERIC
    # Chroma / FLUX.2 (no per-block modulation) and HunyuanVideo's original names are not FLUX.1 either.
    chroma = {k: i for k, i in bfl_flux(double=1, single=1).items() if "mod" not in k}
    assert resolve("auto", chroma)[0] is GENERIC
    hunyuan = from_shapes({"double_blocks.0.img_attn_qkv.weight": (9216, 3072),
                           "double_blocks.0.img_mod.linear.weight": (18432, 3072),
                           "single_blocks.0.linear1.weight": (27648, 3072),
                           "single_blocks.0.modulation.linear.weight": (9216, 3072)})
    assert resolve("auto", hunyuan)[0] is GENERIC


def test_other_names_are_detected():
    assert resolve("auto", from_shapes(MMDIT, "model.diffusion_model."))[0].name == "sd3"
    assert resolve("auto", from_shapes(LDM_UNET, "model.diffusion_model."))[0].name == "unet"
    assert resolve("auto", from_shapes(OPEN_CLIP, "conditioner.embedders.1.model."))[0].name == "clip_text"
    assert resolve("auto", from_shapes(XLABS))[0].name == "flux_controlnet"
    assert resolve("auto", from_shapes(MOE_HUB))[0].name == "llm"
    assert resolve("auto", from_shapes(T5_FULL))[0].name == "t5_encoder"
    assert resolve("auto", from_shapes(BERT_MLM))[0].name == "bert"


def test_resolve_by_name():
    infos = model_infos("bert")
    preset, note = resolve("bert", infos)
    assert preset.name == "bert" and note == "preset bert (chosen)"
    preset, note = resolve("flux", infos)                # allowed: the user's choice
    assert preset.name == "flux" and "not recognised" in note
    assert resolve("generic", infos) == (GENERIC, "preset generic (chosen)")
    with pytest.raises(PolicyError) as exc:
        resolve("nonsense", infos)
    assert exc.value.exit_code == 2 and all(name in str(exc.value) for name in ["auto", *REGISTRY])


# ----------------------------------------------------------------------------- golden quantized sets

@pytest.mark.parametrize("model", sorted(MODELS))
def test_golden_quantized_keys(model):
    got = quantized(model_infos(model))
    check_golden(model, got)
    # The same decisions under any prefix.
    prefix = "model.diffusion_model."
    assert quantized(model_infos(model, prefix)) == sorted(prefix + k for k in got)


def test_golden_quantized_keys_bfl_flux():
    got = quantized(bfl_flux())
    check_golden("flux_bfl", got)
    # double block: qkv, proj, mlp.0, mlp.2 and mod.lin of each stream; single block: linear1, linear2, modulation
    assert len(got) == 19 * 10 + 38 * 3


@pytest.mark.parametrize("model", sorted(MODELS))
def test_preset_rules_only_target_matrices(model):
    """A preset's --quantize rules name weights of layers, never a bias or norm (no 'rule ignored' noise)."""
    for key, d in decisions(model_infos(model))[2].items():
        assert "cannot quantize" not in d.reason, (key, d.reason)


# ----------------------------------------------------------------------------- documented keeps, key by key

# (model, key, action): a handful of keys per preset, each one a documented choice.
TINY_CASES = [
    # flux: blocks' attention, MLPs and modulation quantized; embedders, final layer kept
    ("flux", "transformer_blocks.0.attn.to_q.weight", Q), ("flux", "transformer_blocks.0.attn.add_k_proj.weight", Q),
    ("flux", "transformer_blocks.0.attn.to_add_out.weight", Q),
    ("flux", "transformer_blocks.1.ff_context.net.2.weight", Q),
    ("flux", "single_transformer_blocks.0.attn.to_k.weight", Q),
    ("flux", "single_transformer_blocks.1.proj_mlp.weight", Q),
    ("flux", "single_transformer_blocks.1.proj_out.weight", Q),
    ("flux", "transformer_blocks.0.norm1.linear.weight", Q),
    ("flux", "transformer_blocks.1.norm1_context.linear.weight", Q),
    ("flux", "single_transformer_blocks.0.norm.linear.weight", Q), ("flux", "norm_out.linear.weight", K),
    ("flux", "transformer_blocks.0.norm1.linear.bias", K),
    ("flux", "proj_out.weight", K), ("flux", "x_embedder.weight", K), ("flux", "context_embedder.weight", K),
    ("flux", "time_text_embed.guidance_embedder.linear_2.weight", K),
    ("flux", "transformer_blocks.0.attn.norm_q.weight", K),
    ("flux", "transformer_blocks.0.attn.to_q.bias", K),
    # flux_controlnet: the ControlNet's output projections and embedders kept
    ("flux_controlnet", "transformer_blocks.0.attn.to_v.weight", Q),
    ("flux_controlnet", "single_transformer_blocks.0.proj_out.weight", Q),
    ("flux_controlnet", "controlnet_blocks.0.weight", K), ("flux_controlnet", "controlnet_single_blocks.0.weight", K),
    ("flux_controlnet", "controlnet_x_embedder.weight", K), ("flux_controlnet", "controlnet_mode_embedder.weight", K),
    ("flux_controlnet", "transformer_blocks.0.norm1.linear.weight", Q),
    ("flux_controlnet", "single_transformer_blocks.0.norm.linear.weight", Q),
    # sd3: attn, attn2 (block 1 is context_pre_only) and modulation quantized, final layer kept
    ("sd3", "transformer_blocks.0.attn2.to_q.weight", Q), ("sd3", "transformer_blocks.1.attn.add_q_proj.weight", Q),
    ("sd3", "transformer_blocks.0.attn.to_add_out.weight", Q),
    ("sd3", "transformer_blocks.1.ff.net.0.proj.weight", Q),
    ("sd3", "transformer_blocks.0.norm1.linear.weight", Q),
    ("sd3", "transformer_blocks.1.norm1_context.linear.weight", Q),
    ("sd3", "pos_embed.proj.weight", K), ("sd3", "norm_out.linear.weight", K), ("sd3", "proj_out.weight", K),
    # qwen_image: comfy-quants' list
    ("qwen_image", "transformer_blocks.0.img_mod.1.weight", K),
    ("qwen_image", "transformer_blocks.0.txt_mod.1.weight", Q),
    ("qwen_image", "transformer_blocks.1.img_mod.1.weight", Q),
    ("qwen_image", "transformer_blocks.1.attn.to_out.0.weight", Q),
    ("qwen_image", "transformer_blocks.0.attn.add_v_proj.weight", Q),
    ("qwen_image", "transformer_blocks.1.txt_mlp.net.2.weight", Q),
    ("qwen_image", "img_in.weight", K), ("qwen_image", "txt_in.weight", K), ("qwen_image", "txt_norm.weight", K),
    ("qwen_image", "norm_out.linear.weight", K), ("qwen_image", "proj_out.weight", K),
    ("qwen_image", "time_text_embed.timestep_embedder.linear_1.weight", K),
    # unet: transformer attention and ff quantized; proj_in/out, time_emb_proj, embeddings, convs kept
    ("unet_sdxl", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight", Q),
    ("unet_sdxl", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight", Q),
    ("unet_sdxl", "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight", Q),
    ("unet_sdxl", "down_blocks.1.attentions.0.proj_in.weight", K),
    ("unet_sdxl", "up_blocks.0.attentions.0.proj_out.weight", K),
    ("unet_sdxl", "down_blocks.0.resnets.0.time_emb_proj.weight", K),
    ("unet_sdxl", "add_embedding.linear_1.weight", K),
    ("unet_sdxl", "time_embedding.linear_2.weight", K), ("unet_sdxl", "down_blocks.1.resnets.0.conv1.weight", K),
    ("unet_sd15", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", Q),
    ("unet_sd15", "down_blocks.0.attentions.0.proj_in.weight", K), ("unet_sd15", "conv_in.weight", K),
    # clip_text: layers quantized; embeddings and text_projection kept
    ("clip_text_projection", "text_model.encoder.layers.0.self_attn.q_proj.weight", Q),
    ("clip_text_projection", "text_model.encoder.layers.1.self_attn.out_proj.weight", Q),
    ("clip_text_projection", "text_model.encoder.layers.1.mlp.fc2.weight", Q),
    ("clip_text_projection", "text_projection.weight", K),
    ("clip_text_projection", "text_model.embeddings.token_embedding.weight", K),
    ("clip_text", "encoder.layers.0.self_attn.k_proj.weight", Q),
    ("clip_text", "embeddings.position_embedding.weight", K),
    # t5_encoder: wo kept, the rest of the block quantized
    ("t5_encoder", "encoder.block.0.layer.0.SelfAttention.q.weight", Q),
    ("t5_encoder", "encoder.block.1.layer.0.SelfAttention.o.weight", Q),
    ("t5_encoder", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", Q),
    ("t5_encoder", "encoder.block.1.layer.1.DenseReluDense.wi_1.weight", Q),
    ("t5_encoder", "encoder.block.0.layer.1.DenseReluDense.wo.weight", K),
    ("t5_encoder", "shared.weight", K), ("t5_encoder", "encoder.embed_tokens.weight", K),
    ("t5_encoder", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", K),
    # bert
    ("bert", "encoder.layer.0.attention.self.query.weight", Q),
    ("bert", "encoder.layer.1.attention.output.dense.weight", Q),
    ("bert", "encoder.layer.0.intermediate.dense.weight", Q), ("bert", "encoder.layer.1.output.dense.weight", Q),
    ("bert", "embeddings.word_embeddings.weight", K), ("bert", "pooler.dense.weight", K),
    # llm
    ("llama", "model.layers.0.self_attn.q_proj.weight", Q), ("llama", "model.layers.1.self_attn.o_proj.weight", Q),
    ("llama", "model.layers.0.mlp.gate_proj.weight", Q), ("llama", "model.layers.1.mlp.down_proj.weight", Q),
    ("llama", "model.embed_tokens.weight", K), ("llama", "lm_head.weight", K),
]


@pytest.mark.parametrize("model,key,action", TINY_CASES, ids=[f"{m}:{k}" for m, k, _ in TINY_CASES])
def test_documented_decisions_on_tiny_models(model, key, action):
    infos = model_infos(model)
    assert key in infos, f"{key} is not a key of {model}"
    d = decisions(infos)[2][key]
    assert d.action is action, d.reason


# (keys and shapes, prefix, key, action) on the hand-written names
HAND_CASES = [
    ("bfl", "img_in.weight", K), ("bfl", "txt_in.weight", K), ("bfl", "time_in.out_layer.weight", K),
    ("bfl", "vector_in.in_layer.weight", K), ("bfl", "guidance_in.in_layer.weight", K),
    ("bfl", "double_blocks.0.img_attn.qkv.weight", Q), ("bfl", "double_blocks.18.txt_attn.proj.weight", Q),
    ("bfl", "double_blocks.3.img_mlp.0.weight", Q), ("bfl", "double_blocks.3.txt_mlp.2.weight", Q),
    ("bfl", "single_blocks.0.linear1.weight", Q), ("bfl", "single_blocks.37.linear2.weight", Q),
    ("bfl", "double_blocks.0.img_mod.lin.weight", Q), ("bfl", "double_blocks.7.txt_mod.lin.weight", Q),
    ("bfl", "single_blocks.12.modulation.lin.weight", Q), ("bfl", "final_layer.linear.weight", K),
    ("bfl", "double_blocks.0.img_mod.lin.bias", K),
    ("bfl", "final_layer.adaLN_modulation.1.weight", K), ("bfl", "double_blocks.0.img_attn.norm.query_norm.scale", K),
    ("bfl", "double_blocks.0.img_attn.qkv.bias", K),
    ("mmdit", "joint_blocks.0.x_block.attn.qkv.weight", Q), ("mmdit", "joint_blocks.0.x_block.attn2.proj.weight", Q),
    ("mmdit", "joint_blocks.1.context_block.mlp.fc2.weight", Q),
    ("mmdit", "joint_blocks.2.context_block.attn.qkv.weight", Q),
    ("mmdit", "joint_blocks.0.x_block.adaLN_modulation.1.weight", Q),
    ("mmdit", "joint_blocks.2.context_block.adaLN_modulation.1.weight", Q),
    ("mmdit", "final_layer.linear.weight", K), ("mmdit", "final_layer.adaLN_modulation.1.weight", K),
    ("mmdit", "t_embedder.mlp.2.weight", K), ("mmdit", "y_embedder.mlp.0.weight", K),
    ("mmdit", "context_embedder.weight", K),
    ("ldm", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", Q),
    ("ldm", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", Q),
    ("ldm", "middle_block.1.transformer_blocks.0.attn1.to_v.weight", Q),
    ("ldm", "output_blocks.2.1.transformer_blocks.9.ff.net.2.weight", Q),
    ("ldm", "input_blocks.1.1.proj_in.weight", K), ("ldm", "middle_block.1.proj_out.weight", K),
    ("ldm", "input_blocks.1.0.emb_layers.1.weight", K), ("ldm", "middle_block.0.emb_layers.1.weight", K),
    ("ldm", "time_embed.0.weight", K), ("ldm", "label_emb.0.0.weight", K), ("ldm", "input_blocks.0.0.weight", K),
    ("openclip", "transformer.resblocks.0.attn.out_proj.weight", Q),
    ("openclip", "transformer.resblocks.0.mlp.c_fc.weight", Q),
    ("openclip", "transformer.resblocks.0.attn.in_proj_weight", K), ("openclip", "token_embedding.weight", K),
    ("openclip", "text_projection", K),
    ("xlabs", "double_blocks.1.img_attn.qkv.weight", Q), ("xlabs", "double_blocks.0.txt_mlp.0.weight", Q),
    ("xlabs", "controlnet_blocks.0.weight", K), ("xlabs", "pos_embed_input.weight", K),
    ("xlabs", "double_blocks.0.img_mod.lin.weight", Q), ("xlabs", "input_hint_block.0.weight", K),
    ("moe", "model.layers.0.block_sparse_moe.experts.0.w1.weight", Q),
    ("moe", "model.layers.0.block_sparse_moe.experts.7.w2.weight", Q),
    ("moe", "model.layers.1.mlp.experts.59.up_proj.weight", Q),
    ("moe", "model.layers.1.mlp.shared_expert.down_proj.weight", Q),
    ("moe", "model.layers.0.block_sparse_moe.gate.weight", K), ("moe", "model.layers.1.mlp.gate.weight", K),
    ("moe", "model.layers.1.mlp.shared_expert_gate.weight", K),
    ("moe", "model.visual.blocks.0.mlp.gate_proj.weight", K),
    ("moe", "model.visual.merger.mlp.0.weight", K), ("moe", "lm_head.weight", K),
    ("moe", "model.embed_tokens.weight", K),
    ("t5", "decoder.block.0.layer.1.EncDecAttention.k.weight", Q),
    ("t5", "decoder.block.0.layer.2.DenseReluDense.wi_1.weight", Q),
    ("t5", "decoder.block.0.layer.2.DenseReluDense.wo.weight", K),
    ("t5", "encoder.block.0.layer.1.DenseReluDense.wo.weight", K),
    ("t5", "lm_head.weight", K),
    ("bert_mlm", "bert.encoder.layer.0.attention.self.query.weight", Q),
    ("bert_mlm", "bert.encoder.layer.0.output.dense.weight", Q),
    ("bert_mlm", "cls.predictions.transform.dense.weight", K), ("bert_mlm", "cls.predictions.decoder.weight", K),
    ("bert_mlm", "cls.seq_relationship.weight", K),
]
HAND = {
    "bfl": lambda p: bfl_flux(p), "mmdit": lambda p: from_shapes(MMDIT, p), "ldm": lambda p: from_shapes(LDM_UNET, p),
    "openclip": lambda p: from_shapes(OPEN_CLIP, p), "xlabs": lambda p: from_shapes(XLABS, p),
    "moe": lambda p: from_shapes(MOE_HUB, p), "t5": lambda p: from_shapes(T5_FULL, p),
    "bert_mlm": lambda p: from_shapes(BERT_MLM, p),
}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("names,key,action", HAND_CASES, ids=[f"{n}:{k}" for n, k, _ in HAND_CASES])
def test_documented_decisions_on_other_key_names(names, key, action, prefix):
    infos = HAND[names](prefix)
    d = decisions(infos)[2][prefix + key]
    assert d.action is action, d.reason


# ----------------------------------------------------------------------------- the modulation opt-out

def _blocks(infos: dict, stack: str) -> set[str]:
    """The ``<prefix>stack.N.`` heads of the blocks of one stack (``double_blocks`` ...) in ``infos``."""
    rx = re.compile(r"(.*?(?:^|\.))" + re.escape(stack) + r"\.(\d+)\.")
    return {m[1] + f"{stack}.{m[2]}." for k in infos if (m := rx.match(k))}


def modulation_tensors(infos: dict) -> set[str]:
    """Every per-block AdaLN modulation tensor (weight and bias) in ``infos``, named layer by layer."""
    layers = {"double_blocks": ("img_mod.lin", "txt_mod.lin"), "single_blocks": ("modulation.lin",),
              "transformer_blocks": ("norm1.linear", "norm1_context.linear"),
              "single_transformer_blocks": ("norm.linear",),
              "joint_blocks": ("x_block.adaLN_modulation.1", "context_block.adaLN_modulation.1")}
    return {key for stack, names in layers.items() for head in _blocks(infos, stack) for name in names
            for key in (f"{head}{name}.weight", f"{head}{name}.bias") if key in infos}


def _all_in_one(prefix: str) -> dict[str, TensorInfo]:
    return {**bfl_flux(prefix + "model.diffusion_model.", double=2, single=2),
            **model_infos("t5_encoder", prefix + "text_encoders.t5xxl.transformer."),
            **model_infos("clip_text_projection", prefix + "text_encoders.clip_l.transformer.")}


# (key set, preset it must be detected as, the documented --keep pattern for its names)
OPT_OUT_CASES = [
    ("bfl", "flux", KEEP_MODULATION_BFL), ("all_in_one", "flux", KEEP_MODULATION_BFL),
    ("flux", "flux", KEEP_MODULATION_DIFFUSERS), ("xlabs", "flux_controlnet", KEEP_MODULATION_BFL),
    ("flux_controlnet", "flux_controlnet", KEEP_MODULATION_DIFFUSERS), ("sd3", "sd3", KEEP_MODULATION_DIFFUSERS),
    ("mmdit", "sd3", KEEP_MODULATION_MMDIT),
]
OPT_OUT_KEYS = {**HAND, "all_in_one": _all_in_one, **{m: functools.partial(model_infos, m)
                                                      for m in ("flux", "flux_controlnet", "sd3")}}


@pytest.mark.parametrize("prefix", ["", "transformer."])
@pytest.mark.parametrize("names,preset,pattern", OPT_OUT_CASES, ids=[f"{n}-{p}" for n, p, _ in OPT_OUT_CASES])
def test_documented_modulation_opt_out_keeps_exactly_the_modulation(names, preset, pattern, prefix):
    """The --keep each preset documents for drifting colours matches every per-block modulation tensor and no
    other key (not the final layer's adaLN_modulation, not norm_out, not a bundled encoder), and turns
    exactly the modulation weights the preset quantizes back to BF16."""
    infos = OPT_OUT_KEYS[names](prefix)
    want = modulation_tensors(infos)
    weights = {k for k in want if k.endswith(".weight")}
    assert weights and resolve("auto", infos)[0].name == preset
    assert {k for k in infos if Rule(K, pattern).matches(k)} == want

    base = {k: d.action for k, d in decisions(infos)[2].items()}
    opted = {k: d.action for k, d in decisions(infos, policy=Policy(rules=(Rule(K, pattern),)))[2].items()}
    assert {k for k in infos if base[k] is Q and opted[k] is K} == weights
    assert all(opted[k] is K for k in want)
    assert {k: a for k, a in base.items() if k not in want} == {k: a for k, a in opted.items() if k not in want}


@pytest.mark.parametrize("preset,patterns", [
    ("flux", (KEEP_MODULATION_BFL, KEEP_MODULATION_DIFFUSERS)),
    ("flux_controlnet", (KEEP_MODULATION_BFL, KEEP_MODULATION_DIFFUSERS)),
    ("sd3", (KEEP_MODULATION_DIFFUSERS, KEEP_MODULATION_MMDIT)),
])
def test_the_modulation_opt_out_is_documented_with_the_tested_patterns(preset, patterns):
    p = REGISTRY[preset]
    why = " ".join(why for what, why in p.quantizes if "modulation" in what)
    docs = (ROOT.parent / "docs" / "presets.md").read_text()
    section = docs.split(f"## `{preset}`", 1)[1].split("\n## ", 1)[0]
    for pattern in patterns:
        flag = f"--keep '{pattern}'"
        assert flag in why and flag in p.reference and f"`{flag}`" in section, (preset, flag)
    assert "--quantize" not in p.reference
    assert not any("modulation" in what and "final_layer" not in what for what, _ in p.keeps)


def test_moe_with_fused_experts_keeps_its_router():
    """transformers >= 5 saves routed experts as fused 3-D parameters: the policy cannot quantize those."""
    infos = {k: info(k, tuple(t.shape), BF16) for k, t in tiny_qwen2_moe().state_dict().items()}
    p, _, d = decisions(infos)
    assert p.name == "llm"
    assert d["model.layers.0.mlp.gate.weight"].action is K
    assert d["model.layers.0.mlp.shared_expert_gate.weight"].action is K
    assert d["model.layers.0.mlp.shared_expert.up_proj.weight"].action is Q
    fused = d["model.layers.0.mlp.experts.gate_up_proj"]
    assert (fused.kind, fused.action) == (TensorKind.PARAM, K)


def test_quantize_conv_still_applies_under_a_preset():
    """Presets never keep convolutions by rule (so --quantize-conv works), except SD1.x's 1x1 proj_in/out."""
    infos = model_infos("unet_sd15")
    d = decisions(infos, policy=Policy(quantize_conv=True))[2]
    convs = {k for k, x in d.items() if x.kind is TensorKind.CONV}
    kept = {k for k in convs if d[k].action is K}
    assert convs and kept == {k for k in convs if re.search(r"attentions\.\d+\.proj_(in|out)\.weight$", k)}


def test_all_in_one_checkpoint_gets_each_components_rules():
    """A ComfyUI all-in-one FLUX file: the FLUX rules under model.diffusion_model., the T5 and CLIP rules
    under their own prefixes, nothing across."""
    t5, clip = "text_encoders.t5xxl.transformer.", "text_encoders.clip_l.transformer."
    infos = {**bfl_flux("model.diffusion_model.", double=2, single=2), **model_infos("t5_encoder", t5),
             **model_infos("clip_text_projection", clip)}
    preset, note, d = decisions(infos)
    assert preset.name == "flux"
    assert f"t5_encoder at '{t5}'" in note and f"clip_text at '{clip}text_model.'" in note
    assert d["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"].action is Q
    assert d["model.diffusion_model.double_blocks.0.img_mod.lin.weight"].action is Q
    assert d["model.diffusion_model.final_layer.adaLN_modulation.1.weight"].action is K
    assert d[t5 + "encoder.block.0.layer.1.DenseReluDense.wo.weight"].action is K
    assert d[t5 + "encoder.block.0.layer.0.SelfAttention.q.weight"].action is Q
    assert d[clip + "text_model.encoder.layers.0.self_attn.q_proj.weight"].action is Q
    assert d[clip + "text_projection.weight"].action is K
    # the encoders alone give the same decisions on their keys
    for part, prefix in (("t5_encoder", t5), ("clip_text_projection", clip)):
        alone = decisions(model_infos(part, prefix))[2]
        assert {k: x.action for k, x in alone.items()} == {k: d[k].action for k in alone}


def test_a_chosen_preset_that_does_not_fit_changes_nothing():
    infos = model_infos("bert")
    generic = {k: x.action for k, x in decisions(infos, "generic")[2].items()}
    assert {k: x.action for k, x in decisions(infos, "flux")[2].items()} == generic


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux") / "flux.safetensors"
    save_state_dict(build("flux"), path)
    return path


def fp8_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"}


def test_cli_convert_prints_the_detected_preset(flux_file, tmp_path):
    out = tmp_path / "flux-fp8.safetensors"
    result = run("convert", flux_file, out, "--preset", "auto", "--recipe", "compact", "-q")
    assert result.exit_code == 0, result.output
    assert "preset flux (detected" in result.output
    assert fp8_keys(out) == set((GOLDEN_DIR / "preset_flux.txt").read_text().split())
    with safe_open(str(out), "pt") as f:
        policy = json.loads(f.metadata()["quantkit.policy"])
    assert policy["name"] == "flux" and policy["rules"]


def test_cli_user_rules_win_over_the_preset(flux_file, tmp_path):
    out = tmp_path / "flux-fp8.safetensors"
    result = run("convert", flux_file, out, "-q", "--recipe", "compact", "--keep", "transformer_blocks.0.attn.to_q",
                 "--quantize", "x_embedder", "--keep", KEEP_MODULATION_DIFFUSERS)
    assert result.exit_code == 0, result.output
    got = fp8_keys(out)
    assert "transformer_blocks.0.attn.to_q.weight" not in got and "transformer_blocks.1.attn.to_q.weight" in got
    assert "x_embedder.weight" in got
    modulation = {k for k in modulation_tensors(model_infos("flux")) if k.endswith(".weight")}
    assert modulation and not modulation & got


def test_cli_a_preset_of_another_architecture_is_allowed(tmp_path):
    src, out = tmp_path / "bert.safetensors", tmp_path / "bert-fp8.safetensors"
    save_state_dict(build("bert"), src)
    result = run("convert", src, out, "--preset", "flux", "--recipe", "compact", "-q")
    assert result.exit_code == 0, result.output
    assert "preset flux (chosen; its architecture was not recognised" in result.output
    assert fp8_keys(out) == set((GOLDEN_DIR / "policy_bert.txt").read_text().split())


def test_cli_unknown_preset_exits_2_listing_the_known_ones(flux_file, tmp_path):
    for command in (["convert", flux_file, tmp_path / "out.safetensors"], ["plan", flux_file]):
        result = run(*command, "--preset", "nonsense")
        assert result.exit_code == 2
        assert "unknown preset 'nonsense'" in result.output
        assert all(name in result.output for name in ["auto", *REGISTRY])
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_plan_shows_the_preset_rules(flux_file, tmp_path):
    report = tmp_path / "plan.json"
    result = run("plan", flux_file, "--recipe", "compact", "--json", report)
    assert result.exit_code == 0 and "preset flux (detected" in result.output
    plan = json.loads(report.read_text())
    assert plan["policy"]["name"] == "flux" and ["keep", "proj_out"] in plan["policy"]["rules"]
    actions = {t["name"]: t["action"] for t in plan["tensors"]}
    assert actions["transformer_blocks.0.attn.to_q.weight"] == "quantize" and actions["proj_out.weight"] == "keep"


def test_cli_presets_lists_and_explains_every_preset():
    result = run("presets")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name, p in REGISTRY.items():
        assert any(line.split()[0] == name and p.summary in line for line in lines), name
    for name, p in REGISTRY.items():
        result = run("presets", "--show", name)
        assert result.exit_code == 0 and p.summary in result.output
        assert all(what in result.output for what, _ in p.keeps)
        if p.reference:
            assert p.reference in result.output
    result = run("presets", "--show", "nonsense")
    assert result.exit_code == 2 and "known presets" in result.output


# ----------------------------------------------------------------------------- model output

# Relative L2 error of each tiny model's output, FP8 (per-tensor scales) under its preset vs BF16. Measured:
# diffusers models 0.002 (sd3, flux_controlnet) to 0.013 (unet_sdxl); bert 0.001, llama 0.022, clip_text 0.034
# to 0.042, t5_encoder 0.048. The text encoders are 32 wide and 2 layers deep with random weights: every FP8
# layer adds 2-3% and nothing averages it out (the generic policy, which keeps their attention, gives 0.03 for
# T5). The cosine bar is the one a 5% error implies (1 - 0.05**2 / 2 = 0.99875), rounded down.
MAX_REL_ERROR = 0.05
MIN_COSINE = 0.998


def _loaded(model, state):
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_output_under_its_preset(model, tmp_path):
    net = without_zero_layers(build(model))
    src, out = tmp_path / "src.safetensors", tmp_path / "fp8.safetensors"
    original = save_state_dict(net, src)
    result = convert(str(src), str(out), ConvertOptions(preset="auto", recipe=Recipe.COMPACT))
    assert result.notes[0].startswith(f"preset {MODELS[model]} (detected")
    assert fp8_keys(out) == set((GOLDEN_DIR / f"preset_{model}.txt").read_text().split())

    as_float = {k: v.float() if v.is_floating_point() else v for k, v in original.items()}
    reference = forward(model, _loaded(net, as_float))
    restored = forward(model, _loaded(build(model), load_dequantized(str(out))))
    rel = float((reference - restored).double().norm() / reference.double().norm())
    cos = float(torch.nn.functional.cosine_similarity(reference.flatten().double(), restored.flatten().double(),
                                                      dim=0))
    assert reference.abs().max() > 0 and rel <= MAX_REL_ERROR and cos >= MIN_COSINE, (rel, cos)


# ----------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("model", sorted(MODELS))
def test_recipe_mixed_is_compact_without_the_attention(model, tmp_path):
    """--recipe mixed (the default) quantizes what compact (the golden files) quantizes, less the
    attention projections (but FLUX's single-block q/k/v, joined with the MLP under BFL's names)."""
    from quantkit.plan import make_plan
    from quantkit.policy import TensorKind
    from quantkit.sources import open_source
    src = tmp_path / "src.safetensors"
    save_state_dict(build(model), src)
    with open_source(src) as f:
        compact = make_plan(f, ConvertOptions(preset="auto", recipe=Recipe.COMPACT))
        mixed = make_plan(f, ConvertOptions(preset="auto"))
    assert {t.name for t in compact.quantized()} == set((GOLDEN_DIR / f"preset_{model}.txt").read_text().split())
    attention = {t.name for t in compact.quantized() if t.decision.kind is TensorKind.ATTENTION
                 and not (t.decision.rule is not None and t.decision.rule.every_recipe)}
    assert {t.name for t in mixed.quantized()} == {t.name for t in compact.quantized()} - attention
    assert attention or MODELS[model] == "generic"
    kept = [t for t in mixed.tensors if t.name in attention]
    assert all(t.action is K and "recipe mixed" in t.decision.reason for t in kept)
