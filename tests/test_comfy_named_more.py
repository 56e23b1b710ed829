"""More families ComfyUI runs that ``plan`` called ``generic`` (CogVideoX, OmniGen2, Boogu-Image, Hunyuan3D 2.1,
Stable Cascade, Krea 2, Ernie-Image, Lens, Ideogram 4, JoyImage), named without their variant (Stable Video
Diffusion, as ``unet``) or taken for another (HiDream-O1, as ``llm``; Mage-Flow, which runs Qwen-Image's blocks, as
Qwen-Image), under ComfyUI's own names, as ComfyUI's loader builds them: detection names the family and variant,
every weight the preset quantizes is a layer ComfyUI builds as ``nn.Linear``, and default conversion to ``comfy``
and ``comfy- legacy`` reads back with each FP8 weight's scale where ComfyUI's loader reads it.

``tests/comfy_loader_more.json`` holds what ComfyUI (upstream commit 6db4fa2) built from a tiny random model of
each (the same export as ``comfy_loader_families.json``): the model_config class it detected, every key and
shape, and its ``nn.Linear`` layers. Converted and loaded back by that ComfyUI on CPU they gave the figures in
docs/presets.md ("Checked through ComfyUI's loader"). No test here imports ComfyUI.
"""
from __future__ import annotations

import functools
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from quantkit.dtypes import BF16
from quantkit.policy import Action, Policy
from quantkit.presets import GENERIC, resolve
from quantkit.reader import TensorInfo
from runs import run, write_random_source
from test_comfy_named_families import FP8, comfyui_view, manifest_quantized

ROOT = pathlib.Path(__file__).parent

# case -> (preset, variant in the detection line, the model_config class ComfyUI's loader detected)
FAMILIES = {
    "cogvideox": ("cogvideox", "CogVideoX 1.0 t2v", "CogVideoX_T2V"),
    "cogvideox_i2v": ("cogvideox", "CogVideoX 1.0 i2v", "CogVideoX_I2V"),
    "omnigen2": ("omnigen2", "OmniGen2", "Omnigen2"),
    "hunyuan3d21": ("hunyuan3d21", "Hunyuan3D 2.1", "Hunyuan3Dv2_1"),
    "cascade_c": ("stable_cascade", "Stable Cascade stage C", "Stable_Cascade_C"),
    "cascade_b": ("stable_cascade", "Stable Cascade stage B", "Stable_Cascade_B"),
    "svd": ("unet", "Stable Video Diffusion", "SVD_img2vid"),
    "hidream_o1": ("hidream_o1", "HiDream-O1", "HiDreamO1"),
    "mage_flow": ("qwen_image", "Mage-Flow", "MageFlow"),
    "boogu": ("omnigen2", "Boogu-Image", "Boogu"),
    "krea2": ("krea2", "Krea 2", "Krea2"),
    "ernie": ("ernie_image", "Ernie-Image", "ErnieImage"),
    "lens": ("lens", "Lens", "Lens"),
    "ideogram4": ("ideogram4", "Ideogram 4", "Ideogram4"),
    "joyimage": ("joyimage", "JoyImage", "JoyImage"),
}
# SVD is detected by its 320-wide first level (212M parameters at the smallest widths ComfyUI still calls SVD):
# its conversion here reads back that level, the embedders and the head, the temporal layers included.
# HiDream-O1's embed_tokens (Qwen3-VL's 151936-token vocabulary) is left out of its conversion the same way.
PARTS = {"svd": ("input_blocks.0.", "input_blocks.1.", "time_embed.", "label_emb.", "out."),
         "hidream_o1": ("language_model.layers.", "language_model.norm", "t_embedder1.", "x_embedder.",
                        "final_layer2.", "visual.")}


@functools.lru_cache(maxsize=None)
def families() -> dict:
    return json.loads((ROOT / "comfy_loader_more.json").read_text())


def keys(case: str, whole: bool = True) -> dict[str, list[int]]:
    every = families()[case]["keys"]
    return every if whole or case not in PARTS else {k: s for k, s in every.items() if k.startswith(PARTS[case])}


def infos(case: str, prefix: str = "", whole: bool = True) -> dict[str, TensorInfo]:
    return {prefix + k: TensorInfo(prefix + k, BF16, tuple(s), 0, 0) for k, s in keys(case, whole).items()}


def quantized_stems(case: str, keep_attention: bool, whole: bool = True) -> set[str]:
    tensors = infos(case, whole=whole)
    preset, _ = resolve("auto", tensors)
    policy = Policy(keep_attention=keep_attention).with_preset(preset.name, preset.rules(tensors))
    return {k[:-len(".weight")] for k, i in tensors.items()
            if policy.decide(k, i.shape, i.dtype).action is Action.QUANTIZE}


def test_the_table_covers_every_family_comfyui_built():
    assert set(families()) == set(FAMILIES)
    assert {c: f["comfy_class"] for c, f in families().items()} == {c: f[2] for c, f in FAMILIES.items()}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_detection_names_the_family_and_its_variant(case, prefix):
    """Each of these was 'preset generic' before."""
    tensors = infos(case, prefix)
    preset, note = resolve("auto", tensors)
    name, variant, _ = FAMILIES[case]
    assert preset is not GENERIC and preset.name == name, note
    assert preset.variant(tensors) == variant, note
    assert note.startswith(f"preset {name} (detected {variant}"), note


def test_variants_of_one_model_are_named_from_the_patch_embedding():
    def with_patch(shape):
        tensors = dict(infos("cogvideox"))
        tensors["patch_embed.proj.weight"] = TensorInfo("patch_embed.proj.weight", BF16, shape, 0, 0)
        return resolve("auto", tensors)[0].variant(tensors)
    assert with_patch((128, 48, 2, 2)) == "CogVideoX 1.0 inpaint"
    assert with_patch((128, 16 * 8)) == "CogVideoX 1.5 t2v"
    assert with_patch((128, 32 * 8)) == "CogVideoX 1.5 i2v"


@pytest.mark.parametrize("recipe", ["mixed", "compact"])
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_every_quantized_weight_is_a_layer_comfyui_builds_as_linear(case, recipe):
    got = quantized_stems(case, keep_attention=recipe == "mixed")
    assert got, "nothing quantized"
    assert got <= set(families()[case]["linear"]), sorted(got - set(families()[case]["linear"]))


def test_what_each_preset_keeps():
    """The AdaLN projections, MoE routers, embedders and final layers stay BF16 in both recipes."""
    kept = {"cogvideox": ("blocks.0.norm1.linear", "blocks.1.norm2.linear", "patch_embed.text_proj",
                          "time_embedding_linear_1", "norm_out.linear", "proj_out"),
            "omnigen2": ("layers.0.norm1.linear", "noise_refiner.0.norm1.linear", "x_embedder",
                         "ref_image_patch_embedder", "time_caption_embed.caption_embedder.1", "norm_out.linear_2"),
            "hunyuan3d21": ("blocks.2.moe.gate", "x_embedder", "t_embedder.mlp.0", "final_layer.linear"),
            "cascade_c": ("down_blocks.0.1.mapper", "down_blocks.0.1.mapper_sca", "down_blocks.0.2.kv_mapper.1",
                          "clip_txt_mapper", "clip_img_mapper"),
            "hidream_o1": ("final_layer2.linear", "x_embedder.proj1", "x_embedder.proj2", "t_embedder1.mlp.0",
                           "language_model.embed_tokens", "visual.blocks.0.attn.qkv", "visual.merger.linear_fc1"),
            "boogu": ("double_stream_layers.0.img_norm1.linear", "double_stream_layers.0.instruct_norm2.linear",
                      "single_stream_layers.0.norm1.linear", "x_embedder", "norm_out.linear_2"),
            "krea2": ("tproj.1", "tmlp.0", "txtmlp.1", "txtfusion.refiner_blocks.0.attn.wq",
                      "txtfusion.layerwise_blocks.0.mlp.up", "first", "last.linear"),
            "ernie": ("adaLN_modulation.1", "text_proj", "time_embedding.linear_1", "final_norm.linear",
                      "final_linear"),
            "lens": ("transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mod.1", "img_in", "txt_in",
                     "time_text_embed.timestep_embedder.linear_1", "norm_out.linear", "proj_out"),
            "ideogram4": ("layers.0.adaln_modulation", "adaln_proj", "input_proj", "llm_cond_proj",
                          "t_embedding.mlp_in", "embed_image_indicator", "final_layer.linear"),
            "joyimage": ("condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1", "proj_out"),
            "svd": ("input_blocks.1.0.time_stack.emb_layers.1", "input_blocks.1.1.time_pos_embed.0",
                    "input_blocks.1.0.emb_layers.1", "time_embed.0", "label_emb.0.0")}
    for case, stems in kept.items():
        assert all(s + ".weight" in families()[case]["keys"] for s in stems), case
        assert not set(stems) & quantized_stems(case, keep_attention=False), case


def test_svd_temporal_transformers_are_quantized_like_the_spatial_ones():
    """The generic rules quantized SVD's time_pos_embed and temporal time_stack.emb_layers and kept its
    temporal attention in every recipe; the spatial transformers' rules now cover the time_stack ones."""
    compact, mixed = quantized_stems("svd", keep_attention=False), quantized_stems("svd", keep_attention=True)
    assert {"input_blocks.1.1.time_stack.0.attn1.to_q", "input_blocks.1.1.time_stack.0.attn2.to_k"} <= compact - mixed
    assert {"input_blocks.1.1.time_stack.0.ff.net.2", "input_blocks.1.1.time_stack.0.ff_in.net.0.proj"} <= mixed


def test_hidream_o1_is_no_longer_taken_for_an_llm():
    """Its Qwen3-VL decoder looks like an LLM: the llm preset claimed it and quantized final_layer2, the layer
    that writes the pixels."""
    from quantkit.presets import REGISTRY
    tensors = infos("hidream_o1")
    assert REGISTRY["llm"].detect(tensors)
    preset, note = resolve("auto", tensors)
    assert preset.name == "hidream_o1" and "bundled encoders" not in note, note


def test_mage_flow_names_itself_and_qwen_image_stays_unnamed():
    tensors = infos("mage_flow")
    qwen = {k: TensorInfo(k, BF16, {"txt_norm.weight": (3584,), "proj_out.weight": (64, 128)}.get(k, i.shape), 0, 0)
            for k, i in tensors.items()}
    assert resolve("auto", tensors)[0].variant(tensors) == "Mage-Flow"
    assert resolve("auto", qwen)[0].variant(qwen) == ""


def test_omnigen2_keeps_its_own_names_under_format_comfy(tmp_path):
    """OmniGen2's names look like diffusers' Lumina 2; ComfyUI reads them as they are, and quantkit used to
    refuse them ('no ComfyUI (Lumina 2) name for image_index_embedding ...')."""
    src = write_source("omnigen2", tmp_path / "omnigen2.safetensors")
    result = run("convert", src, tmp_path / "out.safetensors", "--format", "comfy", "-q")
    assert result.exit_code == 0, result.output
    assert set(load_file(str(tmp_path / "out.safetensors"))) >= set(load_file(str(src)))


def write_source(case: str, path: pathlib.Path) -> pathlib.Path:
    return write_random_source(keys(case, whole=False), path, case)


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_default_conversion_loads_as_comfyui_reads_it(case, tmp_path):
    src = write_source(case, tmp_path / f"{case}.safetensors")
    source = load_file(str(src))
    linear = set(families()[case]["linear"])
    for fmt in ("comfy", "comfy-legacy"):
        out = tmp_path / f"{case}.{fmt}.safetensors"
        result = run("convert", src, out, "--format", fmt, "-q")
        assert result.exit_code == 0, result.output
        written = manifest_quantized(out)
        assert written == quantized_stems(case, keep_attention=True, whole=False), fmt
        raw = load_file(str(out))
        if fmt == "comfy":
            assert all(raw[s + ".weight_scale"].dtype == torch.float32 and s + ".comfy_quant" in raw for s in written)
        else:
            assert all(raw[s + ".scale_weight"].dtype == torch.float32 for s in written)
        weights, configs, rest = comfyui_view(out, linear)
        assert set(configs) == written, fmt
        assert not sorted(k for k, v in rest.items() if v.dtype in FP8), fmt
        assert {k for k in raw if not k.endswith((".weight_scale", ".comfy_quant", ".scale_weight"))} \
            - {"scaled_fp8"} == set(source)
        for stem in written:
            w, ref = weights[stem + ".weight"].dequantize().float(), source[stem + ".weight"].float()
            assert torch.nn.functional.cosine_similarity(w.flatten(), ref.flatten(), dim=0) > 0.999, (fmt, stem)


def test_cogvideox_bare_q_k_v_are_attention_so_the_default_recipe_keeps_them():
    # its blocks.N.q/k/v carry no attention token: the default recipe quantized them with the MLP while
    # keeping attn_out, the one family whose attention "mixed" half quantized
    from quantkit.dtypes import BF16
    from quantkit.policy import TensorKind, classify
    for name in ("blocks.0.q.weight", "blocks.0.k.weight", "blocks.0.v.weight", "blocks.0.attn_out.weight"):
        assert classify(name, (64, 64), BF16) is TensorKind.ATTENTION, name
    assert classify("blocks.0.ff_proj.weight", (64, 64), BF16) is TensorKind.LINEAR
