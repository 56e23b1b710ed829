"""Diffusers-named video and image transformers converted for ComfyUI are written under ComfyUI's
key names (quantkit.comfy_names_video / comfy_names_image).

Each family is built tiny with diffusers' own class, with the widths and block counts of the
ComfyUI-named key sets in ``tests/family_keys.json`` (built with ComfyUI's own classes), so the
renamed view must give exactly those keys and shapes. The authority on what each ComfyUI key holds
is diffusers' own converter from the original names (``diffusers.loaders.single_file_utils``):
a converted file, dequantized and run through it, must give back the diffusers model's keys, its
kept tensors bit for bit and its FP8 ones within FP8 rounding.
"""
import json
import pathlib
import re
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.readback import load_dequantized
from quantkit.sources import open_source
from runs import run

diffusers = pytest.importorskip("diffusers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

KEYS = json.loads((pathlib.Path(__file__).parent / "family_keys.json").read_text())
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _wan(**extra):
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16,
                  out_channels=16, text_dim=64, freq_dim=256, ffn_dim=256, num_layers=2)
    config.update(extra)
    cls = diffusers.WanVACETransformer3DModel if "vace_layers" in config else diffusers.WanTransformer3DModel
    return cls(**config)


# ComfyUI's HunyuanVideo module names -> the original release's (Tencent's), which diffusers' converter
# reads: the top-level ones, then those inside a block (after "blocks.N.").
_TENCENT_TOP = {"time_in.in_layer": "time_in.mlp.0", "time_in.out_layer": "time_in.mlp.2",
                "guidance_in.in_layer": "guidance_in.mlp.0", "guidance_in.out_layer": "guidance_in.mlp.2",
                "txt_in.t_embedder.in_layer": "txt_in.t_embedder.mlp.0",
                "txt_in.t_embedder.out_layer": "txt_in.t_embedder.mlp.2",
                "txt_in.c_embedder.in_layer": "txt_in.c_embedder.linear_1",
                "txt_in.c_embedder.out_layer": "txt_in.c_embedder.linear_2"}
_TENCENT_BLOCK = {"self_attn.qkv": "self_attn_qkv", "self_attn.proj": "self_attn_proj", "mlp.0": "mlp.fc1",
                  "mlp.2": "mlp.fc2", "modulation.lin": "modulation.linear", "norm.query_norm": "q_norm",
                  "norm.key_norm": "k_norm",
                  **{f"{s}_{a}": f"{s}_{b}" for s in ("img", "txt") for a, b in (
                      ("mod.lin", "mod.linear"), ("attn.qkv", "attn_qkv"), ("attn.proj", "attn_proj"),
                      ("attn.norm.query_norm", "attn_q_norm"), ("attn.norm.key_norm", "attn_k_norm"),
                      ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2"))}}


def hunyuan_video_from_comfy(state: dict) -> dict:
    """diffusers' HunyuanVideo converter, on ComfyUI's names put back to Tencent's; it hard-codes the
    13B width (3072) to split single_blocks.N.linear1, here the tiny width."""
    def tencent(key):
        module, _, suffix = key.rpartition(".")
        block = re.match(r"(.*blocks\.\d+\.)(.*)", module)
        if block:
            module = block.group(1) + _TENCENT_BLOCK.get(block.group(2), block.group(2))
        return _TENCENT_TOP.get(module, module) + "." + suffix
    real_split = torch.split

    def split(t, sizes, dim=0):
        if tuple(sizes[:3]) == (3072, 3072, 3072):
            h = state["img_in.proj.bias"].shape[0]
            sizes = (h, h, h, t.shape[0] - 3 * h)
        return real_split(t, sizes, dim)
    with mock.patch.object(sfu.torch, "split", split):
        return sfu.convert_hunyuan_video_transformer_to_diffusers({tencent(k): v for k, v in state.items()})


def lumina2_from_comfy(state: dict) -> dict:
    """diffusers' Lumina 2 converter; it hard-codes the 2B model's q/k/v widths (2304, 768, 768) to split
    attention.qkv, here the tiny model's (q, k and v as wide)."""
    real_split = torch.split

    def split(t, sizes, dim=0):
        if list(sizes) == [2304, 768, 768]:
            sizes = [t.shape[0] // 3] * 3
        return real_split(t, sizes, dim)
    with mock.patch.object(sfu.torch, "split", split):
        return sfu.convert_lumina2_to_diffusers(dict(state))


def chroma_from_comfy(state: dict) -> dict:
    """diffusers' Chroma converter, on BFL's RMSNorm names (``.scale``; ComfyUI's modules name them
    ``.weight``); it hard-codes the width (3072) to split single_blocks.N.linear1, here the tiny one."""
    state = {re.sub(r"(_norm|norms\.\d+)\.weight$", r"\1.scale", k): v for k, v in state.items()}
    real_split, h = torch.split, state["img_in.bias"].shape[0]

    def split(t, sizes, dim=0):
        if tuple(sizes) == (3072, 3072, 3072, 12288):
            sizes = (h, h, h, t.shape[0] - 3 * h)
        return real_split(t, sizes, dim)
    with mock.patch.object(sfu.torch, "split", split):
        return sfu.convert_chroma_transformer_checkpoint_to_diffusers(state)


# ComfyUI's own PixArt map (comfy/utils.py PIXART_MAP_BASIC / PIXART_MAP_BLOCK / pixart_to_diffusers at
# silveroxides/ComfyUI 4f874c5), diffusers name -> ComfyUI name, or (name, first row, rows) for a slice:
# diffusers has no single-file PixArt converter, so ComfyUI's load-time map is the reference.
_PIXART_BASIC = {"adaln_single.emb.resolution_embedder.linear_{}": "csize_embedder.mlp.{}",
                 "adaln_single.emb.aspect_ratio_embedder.linear_{}": "ar_embedder.mlp.{}",
                 "adaln_single.emb.timestep_embedder.linear_{}": "t_embedder.mlp.{}",
                 "caption_projection.linear_{}": "y_embedder.y_proj.fc{}"}


def pixart_from_comfy(state: dict) -> dict:
    h = state["t_embedder.mlp.0.bias"].shape[0]
    key_map = {"pos_embed.proj.weight": "x_embedder.proj.weight", "pos_embed.proj.bias": "x_embedder.proj.bias",
               "adaln_single.linear.weight": "t_block.1.weight", "adaln_single.linear.bias": "t_block.1.bias",
               "proj_out.weight": "final_layer.linear.weight", "proj_out.bias": "final_layer.linear.bias",
               "scale_shift_table": "final_layer.scale_shift_table"}
    for d, c in _PIXART_BASIC.items():
        for end in ("weight", "bias"):
            key_map[d.format(1) + "." + end] = c.format(1 if c.endswith("fc{}") else 0) + "." + end
            key_map[d.format(2) + "." + end] = c.format(2) + "." + end
    for i in sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")}):
        d, c = f"transformer_blocks.{i}.", f"blocks.{i}."
        key_map[d + "scale_shift_table"] = c + "scale_shift_table"
        for end in ("weight", "bias"):
            for j, p in enumerate("qkv"):
                key_map[f"{d}attn1.to_{p}.{end}"] = (f"{c}attn.qkv.{end}", j * h, h)
            key_map[f"{d}attn2.to_q.{end}"] = f"{c}cross_attn.q_linear.{end}"
            key_map[f"{d}attn2.to_k.{end}"] = (f"{c}cross_attn.kv_linear.{end}", 0, h)
            key_map[f"{d}attn2.to_v.{end}"] = (f"{c}cross_attn.kv_linear.{end}", h, h)
            for a, b in (("attn1.to_out.0", "attn.proj"), ("attn2.to_out.0", "cross_attn.proj"),
                         ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2")):
                key_map[f"{d}{a}.{end}"] = f"{c}{b}.{end}"
    out = {}
    for d, c in key_map.items():
        if isinstance(c, tuple):
            out[d] = state[c[0]].narrow(0, c[1], c[2])
        elif c in state:
            out[d] = state[c]
    return out


# case -> (the tiny diffusers model, diffusers' converter from ComfyUI's names, its family_keys.json case,
# the preset plan names)
FAMILIES = {
    "wan21_t2v": (lambda: _wan(), sfu.convert_wan_transformer_to_diffusers, "wan21_t2v", "wan"),
    "wan21_i2v": (lambda: _wan(in_channels=36, image_dim=64, added_kv_proj_dim=128),
                  sfu.convert_wan_transformer_to_diffusers, "wan21_i2v", "wan"),
    "wan22_5b": (lambda: _wan(in_channels=48, out_channels=48), sfu.convert_wan_transformer_to_diffusers,
                 "wan22_5b", "wan"),
    "wan_vace": (lambda: _wan(vace_layers=[0], vace_in_channels=96), sfu.convert_wan_transformer_to_diffusers,
                 "wan_vace", "wan"),
    "hunyuan_video": (lambda: diffusers.HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=64, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, mlp_ratio=4.0, text_embed_dim=64, pooled_projection_dim=32,
        rope_axes_dim=(16, 24, 24)), hunyuan_video_from_comfy, "hunyuan_video", "hunyuan_video"),
    "ltxv": (lambda: diffusers.LTXVideoTransformer3DModel(
        in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=64, cross_attention_dim=128,
        num_layers=2, caption_channels=64), sfu.convert_ltx_transformer_checkpoint_to_diffusers, "ltxv", "ltxv"),
    "lumina2": (lambda: diffusers.Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, hidden_size=128, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(16, 24, 24), cap_feat_dim=64),
        lumina2_from_comfy, "lumina2", "lumina2"),
    "zimage": (lambda: diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=128, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=64, axes_dims=[16, 24, 24]),
        sfu.convert_z_image_transformer_checkpoint_to_diffusers, "zimage", "lumina2"),
    "chroma": (lambda: diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=64, axes_dims_rope=(16, 24, 24), approximator_num_channels=64,
        approximator_hidden_dim=256, approximator_layers=2), chroma_from_comfy, "chroma", "chroma"),
    "flux2": (lambda: diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=64, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(16, 16, 16, 16)),
        sfu.convert_flux2_transformer_checkpoint_to_diffusers, "flux2", "flux2"),
    "auraflow": (lambda: diffusers.AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=1,
        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
        out_channels=4, pos_embed_max_size=64), sfu.convert_auraflow_transformer_checkpoint_to_diffusers,
        "auraflow", "auraflow"),
    # HiDream's diffusers names are the original release's, which ComfyUI loads: nothing to rename.
    "hidream": (lambda: diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64,
        num_attention_heads=2, caption_channels=[64, 64], text_emb_dim=64, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(32, 32), max_resolution=(32, 32), llama_layers=[0, 1, 2, 3]),
        sfu.convert_hidream_transformer_to_diffusers, "hidream", "hidream"),
    # diffusers' Mochi converter hard-codes Mochi 1's 48 blocks: the tiny model has them all, narrow.
    "mochi": (lambda: diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=48, pooled_projection_dim=32,
        in_channels=12, text_embed_dim=32, time_embed_dim=256, max_sequence_length=16),
        sfu.convert_mochi_transformer_checkpoint_to_diffusers, "mochi", "mochi"),
    # Predict2's names are NVIDIA's; diffusers' Cosmos converter reads them without the "net." prefix.
    "cosmos_predict2": (lambda: diffusers.CosmosTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=64, num_layers=2, text_embed_dim=64,
        adaln_lora_dim=32, extra_pos_embed_type=None), sfu.convert_cosmos_transformer_checkpoint_to_diffusers,
        "cosmos_predict2", "cosmos"),
    "pixart_sigma": (lambda: diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=128, caption_channels=64, sample_size=16, use_additional_conditions=False),
        pixart_from_comfy, "pixart_sigma", "pixart"),
}
NOT_RENAMED = {"hidream"}
# diffusers sizes Z-Image's FFN and time MLP from its width; the ComfyUI-built key set used other sizes.
SAME_KEYS_ONLY = {"zimage"}
# diffusers' PixArt has no y_embedding (the null caption ComfyUI's model holds; ComfyUI's own load of a
# diffusers PixArt leaves it missing too).
MISSING = {"pixart_sigma": {"y_embedder.y_embedding"}}
# family_keys.json holds 2 Mochi blocks, the last context_pre_only: the tiny model's 48 map onto them.
BLOCKS_AS = {"mochi": lambda k: re.sub(r"^blocks\.(\d+)\.", lambda m: "blocks.1." if m.group(1) == "47" else "blocks.0.", k)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """case -> a tiny diffusers model folder of it (seeded random weights, BF16); built once."""
    made = {}

    def folder(case):
        if case not in made:
            torch.manual_seed(sum(map(ord, case)))
            model = FAMILIES[case][0]()
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn_like(p) * 0.05)
            path = tmp_path_factory.mktemp(f"{case}-diffusers") / "transformer"
            model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
            made[case] = path
        return made[case]
    return folder


def source_state(folder) -> dict:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    noise = float((ref - got).pow(2).sum())
    return float("inf") if noise == 0 else 10 * float(torch.log10(ref.pow(2).sum() / noise))


@pytest.mark.parametrize("case", list(FAMILIES))
def test_the_view_has_comfyuis_keys_and_shapes(folders, case):
    with open_source(folders(case), names="comfyui") as view:
        got = {n: list(i.shape) for n, i in view.tensors.items()}
    want = KEYS[FAMILIES[case][2]]
    want = {k: v for k, v in want.items() if k not in MISSING.get(case, ())}
    if case in BLOCKS_AS:
        assert {BLOCKS_AS[case](k) for k in got} == set(want)
    elif case in SAME_KEYS_ONLY:
        assert set(got) == set(want)
    else:
        assert got == want


@pytest.mark.parametrize("fmt", ["comfy", "comfy-legacy"])
@pytest.mark.parametrize("case", list(FAMILIES))
def test_converted_file_goes_back_through_diffusers_own_converter(folders, tmp_path, case, fmt):
    """(a) ComfyUI's names, each FP8 weight beside its scale; (b) dequantized and renamed by diffusers:
    the source's keys, kept tensors bit for bit, FP8 ones within FP8 rounding."""
    folder = folders(case)
    out = tmp_path / f"{case}.safetensors"
    result = run("convert", folder, out, "--format", fmt)
    assert result.exit_code == 0, result.output
    assert ("written as ComfyUI's" in result.output) != (case in NOT_RENAMED)
    stored = load_file(str(out))
    scale = ".weight_scale" if fmt == "comfy" else ".scale_weight"
    fp8 = [k for k, v in stored.items() if v.dtype in FP8 and k != "scaled_fp8"]      # the legacy marker
    assert fp8, "nothing was quantized"
    assert all(k.endswith(".weight") and k[: -len(".weight")] + scale in stored for k in fp8)
    extra = {"scaled_fp8"} if fmt == "comfy-legacy" else set()
    weights = {k for k in stored if not k.endswith((".weight_scale", ".scale_weight", ".comfy_quant", ".input_scale",
                                                    ".scale_input"))} - extra
    assert {BLOCKS_AS.get(case, str)(k) for k in weights} == set(KEYS[FAMILIES[case][2]]) - MISSING.get(case, set())

    source = source_state(folder)
    back = FAMILIES[case][1]({k: v for k, v in load_dequantized(str(out), dtype=torch.bfloat16).items()})
    assert set(back) == set(source)
    renamed = {k: v for k, v in load_dequantized(str(out), dtype=torch.float32).items()}
    back32 = FAMILIES[case][1](renamed)
    quantized = {k for k, v in FAMILIES[case][1]({k: v for k, v in stored.items() if k in weights}).items()
                 if v.dtype in FP8}
    assert quantized
    assert not {k for k in quantized if ".gate." in k}, "a MoE router in FP8 would not load in ComfyUI"
    for k, t in source.items():
        if k in quantized:
            assert sqnr(t, back32[k]) >= 25, k
        else:
            assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


@pytest.mark.parametrize("case", list(FAMILIES))
def test_nothing_quantized_goes_back_bit_for_bit(folders, tmp_path, case):
    folder = folders(case)
    out = tmp_path / f"{case}-kept.safetensors"
    result = run("convert", folder, out, "--format", "comfy", "--keep", "*")
    assert result.exit_code == 0, result.output
    stored = load_file(str(out))
    assert {BLOCKS_AS.get(case, str)(k) for k in stored} == set(KEYS[FAMILIES[case][2]]) - MISSING.get(case, set())
    back = FAMILIES[case][1](dict(stored))
    source = source_state(folder)
    assert set(back) == set(source)
    for k, t in source.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


@pytest.mark.parametrize("case", list(FAMILIES))
def test_plan_names_the_family_through_the_view(folders, case):
    result = run("plan", folders(case), "--format", "comfy")
    assert result.exit_code == 0, result.output
    assert f"preset {FAMILIES[case][3]}" in result.output, result.output[:2000]


def test_a_wan_key_without_a_comfyui_name_is_refused_before_any_work(folders, tmp_path):
    tensors = source_state(folders("wan21_t2v"))
    tensors["blocks.0.attn1.lora_A.weight"] = torch.zeros(4, 128, dtype=torch.bfloat16)
    src = tmp_path / "wan-extra.safetensors"
    save_file(tensors, str(src))
    result = run("convert", src, tmp_path / "out.safetensors", "--format", "comfy")
    assert result.exit_code == 2, result.output
    assert "blocks.0.attn1.lora_A.weight" in result.output and "Wan" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("fmt", ["comfy", "comfy-legacy"])
def test_a_diffusers_ltx2_transformer_is_refused_before_any_work(tmp_path, fmt):
    """ComfyUI's LTX-2 model holds the text embeddings connectors diffusers keeps apart: the
    transformer alone cannot make a file ComfyUI runs. Refused with what to convert instead."""
    torch.manual_seed(0)
    model = diffusers.LTX2VideoTransformer3DModel(
        in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=64, cross_attention_dim=128,
        num_layers=1, caption_channels=64, audio_in_channels=16, audio_out_channels=16, audio_num_attention_heads=2,
        audio_attention_head_dim=32, audio_cross_attention_dim=64)
    folder = tmp_path / "transformer"
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    for command in (["convert", folder, tmp_path / "out.safetensors", "--format", fmt, "--keep", "*"],
                    ["plan", folder, "--format", fmt]):
        result = run(*command)
        assert result.exit_code == 2, result.output
        assert "LTX-2" in result.output and "connectors" in result.output and "ltx-2-19b" in result.output
        assert "Traceback" not in result.output
    assert not list(tmp_path.glob("out*"))
    assert run("convert", folder, tmp_path / "native.safetensors").exit_code == 0      # diffusers names: fine


def test_a_z_image_patch_size_comfyui_has_no_model_for_is_refused_by_name(tmp_path):
    """ComfyUI's Z-Image has the 2-1 patch embedder only (its own map names all_x_embedder.2-1)."""
    torch.manual_seed(0)
    model = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2, 1), all_f_patch_size=(1, 1), in_channels=16, dim=128, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=64, axes_dims=[16, 24, 24])
    folder = tmp_path / "transformer"
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    result = run("convert", folder, tmp_path / "out.safetensors", "--format", "comfy")
    assert result.exit_code == 2, result.output
    assert ".1-1." in result.output and "Z-Image" in result.output and "Traceback" not in result.output


def test_wan_flf2v_position_embedding_is_comfyuis_img_emb_emb_pos(tmp_path):
    """Wan 2.1 FLF2V's image-embedding positions (diffusers' image_embedder.pos_embed) are ComfyUI's
    img_emb.emb_pos (comfy/ldm/wan/model.py MLPProj; diffusers' converter does not map this key)."""
    torch.manual_seed(0)
    model = _wan(in_channels=36, image_dim=64, added_kv_proj_dim=128, pos_embed_seq_len=514)
    folder = tmp_path / "transformer"
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    out = tmp_path / "flf2v.safetensors"
    assert run("convert", folder, out, "--format", "comfy", "--keep", "*").exit_code == 0
    stored, source = load_file(str(out)), source_state(folder)
    assert set(stored) == set(KEYS["wan21_i2v"]) | {"img_emb.emb_pos"}
    assert torch.equal(stored["img_emb.emb_pos"], source["condition_embedder.image_embedder.pos_embed"])
