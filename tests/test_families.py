"""The ComfyUI-named families (quantkit/presets/video.py, image.py, audio_3d.py): detection and variant, the
layers each preset keeps and quantizes, golden plans, and convert -> validate in both ComfyUI formats.

Key sets: ``tests/family_keys.json`` holds, per case, every key and shape of the state dict of ComfyUI's own
model class for that family (``comfy/ldm/*`` at upstream commit 6db4fa2), built tiny (width 64-128, two
blocks; a few fixed widths the classes hard-code, such as LTX-2's 3840-wide text connectors, Mochi's MLP
and ACE-Step's lyric encoder, shrunk to keep the files small). Weights are random BF16.

Golden files: ``tests/golden/preset_family_<case>.txt`` list, sorted, every key ``--preset auto`` quantizes
(recipe compact: the preset's rules alone). Regenerate on purpose with

    QUANTKIT_UPDATE_GOLDEN=1 pytest tests/test_families.py -k golden

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
from safetensors.torch import save_file

from quantkit.dtypes import BF16
from quantkit.policy import Action, Policy, TensorKind, classify
from quantkit.presets import GENERIC, REGISTRY, resolve
from quantkit.reader import TensorInfo
from runs import run

ROOT = pathlib.Path(__file__).parent
GOLDEN_DIR = ROOT / "golden"
UPDATE_GOLDEN = os.environ.get("QUANTKIT_UPDATE_GOLDEN") == "1"
Q, K = Action.QUANTIZE, Action.KEEP

NEW_PRESETS = {"wan", "hunyuan_video", "ltxv", "cosmos", "kandinsky5", "mochi", "flux2", "chroma", "lumina2",
               "cogvideox", "omnigen2", "hunyuan3d21", "hidream_o1", "krea2", "ernie_image", "lens", "ideogram4", "joyimage",
               "stable_cascade",
               "hidream", "auraflow", "pixart", "hunyuan_dit", "hunyuan3d", "ace_step"}
EXISTING_PRESETS = {"generic", "flux", "flux_controlnet", "sd3", "qwen_image", "unet", "t5_encoder", "clip_text",
                    "bert", "llm"}

# case -> (preset, variant named in the detection line, layers kept, layers quantized by the preset's rules).
# "kept" are the sensitive layers of each architecture; "quantized" the bulk linears (attention included:
# these are decisions before the recipe, i.e. --recipe compact).
FAMILIES = {
    "wan21_t2v": ("wan", "Wan 2.1/2.2 t2v",
                  ["time_projection.1", "head.head", "text_embedding.0", "time_embedding.2", "patch_embedding"],
                  ["blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.0", "blocks.1.ffn.2"]),
    "wan21_i2v": ("wan", "Wan 2.1 i2v", ["time_projection.1", "head.head", "img_emb.proj.1", "img_emb.proj.3"],
                  ["blocks.0.cross_attn.k_img", "blocks.0.cross_attn.v_img", "blocks.0.ffn.0"]),
    "wan22_i2v": ("wan", "Wan 2.2 14B i2v", ["time_projection.1", "head.head"], ["blocks.1.self_attn.v"]),
    "wan22_5b": ("wan", "Wan 2.2 5B TI2V", ["time_projection.1", "head.head"], ["blocks.0.ffn.2"]),
    "wan_vace": ("wan", "Wan 2.1/2.2 VACE", ["vace_patch_embedding", "vace_blocks.0.after_proj",
                                             "vace_blocks.0.before_proj", "head.head"],
                 ["vace_blocks.0.self_attn.q", "vace_blocks.0.ffn.0", "blocks.0.ffn.0"]),
    "hunyuan_video": ("hunyuan_video", "HunyuanVideo 1.0",
                      ["final_layer.linear", "final_layer.adaLN_modulation.1", "txt_in.input_embedder",
                       "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1",
                       "txt_in.individual_token_refiner.blocks.0.mlp.0", "time_in.in_layer", "vector_in.in_layer",
                       "guidance_in.out_layer"],
                      ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "single_blocks.0.linear1",
                       "double_blocks.0.img_mod.lin", "single_blocks.1.modulation.lin"]),
    "hunyuan_video15": ("hunyuan_video", "HunyuanVideo 1.5",
                        ["final_layer.linear", "byt5_in.fc1", "vision_in.proj.1", "cond_type_embedding",
                         "txt_in.c_embedder.in_layer"],
                        ["double_blocks.1.img_attn.proj", "double_blocks.0.img_mlp.2"]),
    "ltxv": ("ltxv", "LTX-Video", ["patchify_proj", "proj_out", "adaln_single.linear",
                                   "adaln_single.emb.timestep_embedder.linear_1", "caption_projection.linear_1"],
             ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_out.0",
              "transformer_blocks.0.ff.net.0.proj"]),
    "ltx2": ("ltxv", "LTX-2 (audio-video)",
             ["audio_adaln_single.linear", "av_ca_a2v_gate_adaln_single.linear", "audio_patchify_proj",
              "audio_proj_out", "audio_caption_projection.linear_2",
              "video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q",
              "audio_embeddings_connector.transformer_1d_blocks.0.ff.net.2"],
             ["transformer_blocks.0.audio_attn1.to_k", "transformer_blocks.1.audio_to_video_attn.to_q",
              "transformer_blocks.0.video_to_audio_attn.to_out.0", "transformer_blocks.0.audio_ff.net.2"]),
    "cosmos1": ("cosmos", "Cosmos 1.0",
                ["blocks.block0.blocks.0.adaLN_modulation.1", "blocks.block1.blocks.2.adaLN_modulation.2",
                 "final_layer.linear", "final_layer.adaLN_modulation.1", "x_embedder.proj.1", "t_embedder.1.linear_1"],
                ["blocks.block0.blocks.0.block.attn.to_q.0", "blocks.block0.blocks.1.block.attn.to_out.0",
                 "blocks.block1.blocks.2.block.layer1"]),
    "cosmos_predict2": ("cosmos", "Cosmos Predict2",
                        ["blocks.0.adaln_modulation_self_attn.1", "blocks.0.adaln_modulation_cross_attn.2",
                         "blocks.1.adaln_modulation_mlp.1", "final_layer.linear", "final_layer.adaln_modulation.2"],
                        ["blocks.0.self_attn.q_proj", "blocks.1.cross_attn.output_proj", "blocks.0.mlp.layer2"]),
    "kandinsky5": ("kandinsky5", "Kandinsky 5", ["out_layer.out_layer", "out_layer.modulation.out_layer",
                                                 "visual_embeddings.in_layer", "text_embeddings.in_layer",
                                                 "time_embeddings.out_layer", "pooled_text_embeddings.in_layer"],
                   ["visual_transformer_blocks.0.cross_attention.to_key",
                    "text_transformer_blocks.0.self_attention.out_layer",
                    "visual_transformer_blocks.1.feed_forward.in_layer",
                    "visual_transformer_blocks.0.visual_modulation.out_layer"]),
    "mochi": ("mochi", "Mochi 1", ["final_layer.linear", "final_layer.mod", "t5_yproj", "t5_y_embedder.to_kv",
                                   "t_embedder.mlp.0"],
              ["blocks.0.attn.qkv_x", "blocks.0.attn.qkv_y", "blocks.1.mlp_x.w1", "blocks.0.mod_x"]),
    "flux2": ("flux2", "FLUX.2", ["double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
                                  "single_stream_modulation.lin", "final_layer.linear",
                                  "final_layer.adaLN_modulation.1", "img_in", "txt_in", "time_in.in_layer",
                                  "guidance_in.out_layer"],
              ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.0.linear1",
               "single_blocks.1.linear2"]),
    "chroma": ("chroma", "Chroma", ["distilled_guidance_layer.in_proj", "distilled_guidance_layer.layers.0.in_layer",
                                    "distilled_guidance_layer.out_proj", "final_layer.linear", "img_in", "txt_in"],
               ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0", "single_blocks.1.linear1"]),
    "lumina2": ("lumina2", "Lumina 2", ["layers.0.adaLN_modulation.1", "noise_refiner.0.adaLN_modulation.1",
                                        "final_layer.linear", "final_layer.adaLN_modulation.1", "x_embedder",
                                        "cap_embedder.1", "t_embedder.mlp.2"],
                ["layers.0.attention.qkv", "layers.1.attention.out", "context_refiner.0.feed_forward.w3",
                 "noise_refiner.0.feed_forward.w1"]),
    "zimage": ("lumina2", "Z-Image", ["layers.1.adaLN_modulation.0", "noise_refiner.0.adaLN_modulation.0",
                                      "final_layer.linear", "cap_embedder.1"],
               ["layers.0.attention.qkv", "layers.0.feed_forward.w2"]),
    "hidream": ("hidream", "HiDream", ["double_stream_blocks.0.block.ff_i.gate",
                                       "single_stream_blocks.1.block.ff_i.gate",
                                       "caption_projection.0.linear", "final_layer.linear",
                                       "final_layer.adaLN_modulation.1", "x_embedder.proj",
                                       "p_embedder.pooled_embedder.linear_1"],
                ["double_stream_blocks.0.block.attn1.to_q_t", "single_stream_blocks.0.block.attn1.to_out",
                 "double_stream_blocks.1.block.ff_i.experts.3.w2",
                 "single_stream_blocks.0.block.ff_i.shared_experts.w1",
                 "double_stream_blocks.0.block.ff_t.w3", "double_stream_blocks.0.block.adaLN_modulation.1"]),
    "auraflow": ("auraflow", "AuraFlow", ["init_x_linear", "cond_seq_linear", "final_linear", "modF.1",
                                          "t_embedder.mlp.0"],
                 ["double_layers.0.attn.w1q", "double_layers.1.attn.w2o", "single_layers.0.attn.w1v",
                  "double_layers.0.mlpX.c_fc1", "single_layers.0.mlp.c_proj", "double_layers.0.modC.1",
                  "single_layers.0.modCX.1"]),
    "pixart_sigma": ("pixart", "PixArt-Sigma", ["t_block.1", "final_layer.linear", "x_embedder.proj",
                                                "y_embedder.y_proj.fc1", "t_embedder.mlp.2"],
                     ["blocks.0.attn.qkv", "blocks.0.cross_attn.kv_linear", "blocks.1.cross_attn.proj",
                      "blocks.1.mlp.fc1"]),
    "hunyuan_dit": ("hunyuan_dit", "HunyuanDiT", ["blocks.0.default_modulation.1", "mlp_t5.0", "mlp_t5.2",
                                                  "pooler.c_proj", "final_layer.linear", "extra_embedder.0"],
                    ["blocks.0.attn1.Wqkv", "blocks.1.attn2.kv_proj", "blocks.0.mlp.fc2"]),
    "hunyuan3d2": ("hunyuan3d", "Hunyuan3D 2.0", ["latent_in", "cond_in", "time_in.in_layer", "final_layer.linear",
                                                  "final_layer.adaLN_modulation.1"],
                   ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2", "double_blocks.0.txt_mod.lin"]),
    "ace": ("ace_step", "ACE-Step 1.0", ["t_block.1", "timestep_embedder.linear_1", "genre_embedder",
                                         "speaker_embedder", "lyric_proj", "final_layer.linear"],
            ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.cross_attn.add_k_proj",
             "transformer_blocks.0.cross_attn.to_add_out", "lyric_encoder.encoders.0.feed_forward.w_1",
             "lyric_encoder.encoders.0.self_attn.linear_q"]),
    "ace15": ("ace_step", "ACE-Step 1.5", ["decoder.time_embed.time_proj", "decoder.time_embed_r.linear_1",
                                           "decoder.condition_embedder", "decoder.proj_out.1", "encoder.text_projector",
                                           "encoder.lyric_encoder.embed_tokens", "tokenizer.quantizer.project_in",
                                           "detokenizer.proj_out"],
              ["decoder.layers.0.self_attn.q_proj", "decoder.layers.1.cross_attn.v_proj",
               "decoder.layers.0.mlp.down_proj", "encoder.lyric_encoder.layers.0.mlp.up_proj",
               "detokenizer.layers.0.self_attn.o_proj"]),
}
PREFIXES = ["", "model.diffusion_model."]


# ----------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _key_sets() -> dict:
    return json.loads((ROOT / "family_keys.json").read_text())


def family_infos(case: str, prefix: str = "") -> dict[str, TensorInfo]:
    return {prefix + k: TensorInfo(prefix + k, BF16, tuple(s), 0, 0) for k, s in _key_sets()[case].items()}


def decisions(infos: dict, preset: str = "auto", keep_attention: bool = False):
    p, note = resolve(preset, infos)
    policy = Policy(keep_attention=keep_attention).with_preset(p.name, p.rules(infos))
    return p, note, {k: policy.decide(k, i.shape, i.dtype) for k, i in infos.items()}


def write_family(case: str, path: pathlib.Path) -> pathlib.Path:
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    save_file({k: (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16) for k, s in _key_sets()[case].items()},
              str(path))
    return path


def check_golden(name: str, got: list[str]) -> None:
    path = GOLDEN_DIR / f"preset_family_{name}.txt"
    text = "".join(k + "\n" for k in got)
    if UPDATE_GOLDEN:
        path.write_text(text)
        return
    how = ("if the preset changed on purpose, regenerate with "
           "QUANTKIT_UPDATE_GOLDEN=1 pytest tests/test_families.py -k golden")
    assert path.exists(), f"missing golden file {path}; {how}"
    want = path.read_text().splitlines()
    added, removed = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    assert got == want, f"{name}: now also quantizes {added}, no longer quantizes {removed}; {how}"


# ----------------------------------------------------------------------------- registry and docs

def test_registry_holds_the_existing_and_the_new_presets_in_order():
    names = list(REGISTRY)
    family_encoders = {"umt5", "qwen25_vl", "qwen3", "mistral3", "gemma3", "llama3"}   # test_family_encoders.py
    assert set(names) == EXISTING_PRESETS | NEW_PRESETS | family_encoders
    # The existing diffusion presets are tried first; ACE-Step 1.5 (whose encoders look like an LLM's) before llm.
    assert names.index("unet") < min(names.index(n) for n in NEW_PRESETS)
    assert max(names.index(n) for n in NEW_PRESETS) < names.index("t5_encoder")
    for name in NEW_PRESETS:
        p = REGISTRY[name]
        assert p.summary and p.detection and p.reference and p.attention
        assert p.keeps and p.quantizes and all(what and why for what, why in p.keeps + p.quantizes)


def test_docs_table_lists_every_new_preset():
    text = (ROOT.parent / "docs" / "presets.md").read_text()
    table = text[text.index("## Families under ComfyUI's names"):text.index("## `wan`")]
    for name in NEW_PRESETS:
        assert f"[`{name}`](#{name})" in table and re.search(rf"^## `{name}`", text, re.M)


@pytest.mark.parametrize("name", sorted(NEW_PRESETS))
def test_presets_show_documents_each_new_preset(name):
    p = REGISTRY[name]
    result = run("presets", "--show", name)
    assert result.exit_code == 0 and p.summary in result.output and p.detection in result.output
    assert all(what in result.output for what, _ in p.keeps + p.quantizes)
    assert p.reference in result.output and p.attention in result.output


# ----------------------------------------------------------------------------- detection

@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_auto_detects_the_family_and_variant(case, prefix):
    infos = family_infos(case, prefix)
    preset, note = resolve("auto", infos)
    name, variant = FAMILIES[case][:2]
    assert preset.name == name, note
    assert note.startswith(f"preset {name} (detected {variant}")
    assert preset.locate(infos) == (prefix,)
    assert "bundled encoders" not in note          # ACE-Step 1.5's lyric/timbre encoders are its own


def test_the_two_misdetections_are_fixed():
    assert not REGISTRY["flux"].detect(family_infos("hunyuan3d2"))      # was FLUX.1
    assert not REGISTRY["flux"].detect(family_infos("hunyuan_video"))
    assert REGISTRY["llm"].detect(family_infos("ace15"))                # its encoders still look like an LLM ...
    assert resolve("auto", family_infos("ace15"))[0].name == "ace_step"  # ... but ace_step is tried first


def test_new_presets_leave_the_existing_test_models_alone():
    """None of the new presets recognises a model an existing preset owns (so their goldens cannot move)."""
    from test_presets import MODELS, UNKNOWN, bfl_flux, from_shapes, LDM_UNET, MMDIT, MOE_HUB, OPEN_CLIP, XLABS, \
        model_infos
    key_lists = [model_infos(m, prefix) for m in [*MODELS, *UNKNOWN] for prefix in ("", "model.diffusion_model.")]
    key_lists += [bfl_flux(), from_shapes(MMDIT), from_shapes(LDM_UNET), from_shapes(OPEN_CLIP), from_shapes(XLABS),
                  from_shapes(MOE_HUB)]
    for infos in key_lists:
        assert not [n for n in NEW_PRESETS if REGISTRY[n].detect(infos)]
    for model, name in MODELS.items():
        assert resolve("auto", model_infos(model))[0].name == name


def test_look_alike_shapes_are_not_detected():
    infos = family_infos("wan21_t2v")
    infos["blocks.0.ffn.0.weight"] = TensorInfo("blocks.0.ffn.0.weight", BF16, (256, 96), 0, 0)   # not [f, h]
    infos["blocks.1.ffn.0.weight"] = TensorInfo("blocks.1.ffn.0.weight", BF16, (256, 96), 0, 0)
    assert resolve("auto", infos)[0] is GENERIC
    infos = family_infos("flux2")
    infos["single_stream_modulation.lin.weight"] = TensorInfo("single_stream_modulation.lin.weight", BF16,
                                                               (5 * 128, 128), 0, 0)
    assert resolve("auto", infos)[0] is GENERIC


# ----------------------------------------------------------------------------- decisions

@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_sensitive_layers_kept_and_bulk_quantized(case):
    _, _, keep, quantize = FAMILIES[case]
    _, _, got = decisions(family_infos(case))
    for layer in keep:
        d = got[layer + ".weight"]
        assert d.action is K, f"{layer}: {d.reason}"
    for layer in quantize:
        d = got[layer + ".weight"]
        assert d.action is Q, f"{layer}: {d.reason}"
    assert all(d.action is K for k, d in got.items() if k.endswith(".bias") or len(family_infos(case)[k].shape) < 2)


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_recipe_mixed_keeps_the_attention_the_preset_quantizes(case):
    compact, mixed = decisions(family_infos(case))[2], decisions(family_infos(case), keep_attention=True)[2]
    changed = {k for k in compact if compact[k].action is not mixed[k].action}
    assert changed and all(compact[k].kind is TensorKind.ATTENTION and mixed[k].action is K for k in changed)


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_golden_quantized_keys(case):
    got = sorted(k for k, d in decisions(family_infos(case))[2].items() if d.action is Q)
    check_golden(case, got)
    prefixed = sorted(k for k, d in decisions(family_infos(case, "model.diffusion_model."))[2].items()
                      if d.action is Q)
    assert prefixed == ["model.diffusion_model." + k for k in got]


# ----------------------------------------------------------------------------- generic

def test_generic_never_quantizes_an_moe_router():
    infos = family_infos("hidream")
    _, note, got = decisions(infos, "generic")
    routers = [k for k in infos if k.endswith("ff_i.gate.weight")]
    assert len(routers) == 4 and all(got[k].action is K for k in routers)
    assert all("preset generic: keep" in got[k].reason for k in routers)
    # A gate that routes nothing (no experts beside it) is an ordinary linear.
    plain = {"mlp.gate.weight": TensorInfo("mlp.gate.weight", BF16, (64, 32), 0, 0),
             "mlp.up.weight": TensorInfo("mlp.up.weight", BF16, (64, 32), 0, 0)}
    assert all(d.action is Q for d in decisions(plain, "generic")[2].values())
    assert GENERIC.rules(plain) == ()


def test_cosmos_attention_modulation_is_a_modulation_not_attention():
    for key in ("blocks.0.adaln_modulation_self_attn.1.weight", "blocks.0.adaln_modulation_cross_attn.2.weight",
                "blocks.0.adaln_modulation_mlp.1.weight"):
        assert classify(key, (32, 128), BF16) is TensorKind.LINEAR
    assert classify("blocks.0.self_attn.q_proj.weight", (128, 128), BF16) is TensorKind.ATTENTION
    # Under generic, the three modulations of a Predict2 block now get one decision.
    got = decisions(family_infos("cosmos_predict2"), "generic")[2]
    assert {got[f"blocks.0.adaln_modulation_{m}.1.weight"].action for m in ("self_attn", "cross_attn", "mlp")} == {Q}


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_plan_names_the_family_and_convert_reads_back(case, work):
    src = write_family(case, work / f"{case}.safetensors")
    name, variant = FAMILIES[case][:2]
    result = run("plan", src)
    assert result.exit_code == 0, result.output
    assert f"preset {name} (detected {variant}" in result.output and "generic" not in result.output.splitlines()[0]
    for fmt in ("comfy", "comfy-legacy"):
        out = work / f"{case}-{fmt}.safetensors"
        result = run("convert", src, out, "--format", fmt, "--recipe", "compact", "-q")
        assert result.exit_code == 0, result.output
        with safe_open(str(out), "pt") as f:
            fp8 = {k[:-len(".weight")] for k in f.keys()
                   if k.endswith(".weight") and f.get_slice(k).get_dtype() == "F8_E4M3"}
        assert fp8 and not fp8 & set(FAMILIES[case][2]) and set(FAMILIES[case][3]) <= fp8
        result = run("validate", out, "--against", src)
        assert result.exit_code == 0, result.output


def test_a_wan_shard_of_blocks_only_is_still_wan():
    infos = {k: i for k, i in family_infos("wan22_i2v").items() if k.startswith("blocks.1.")}
    preset, note = resolve("auto", infos)
    assert preset.name == "wan" and "a shard" in note
    assert sorted(k for k, d in decisions(infos)[2].items() if d.action is Q) == sorted(
        k for k in (GOLDEN_DIR / "preset_family_wan22_i2v.txt").read_text().split() if k.startswith("blocks.1."))
