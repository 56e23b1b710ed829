"""Diffusers-named transformers and ComfyUI's names: ``plan`` names the family on diffusers' own names
(not only with ``--format comfy``), with the same decisions as under ComfyUI's names; Cosmos
Predict2 is written under NVIDIA's names (``comfy_names_video.cosmos_predict2_to_comfy``), checked
against diffusers' own converter; Cosmos 1.0 is refused before any work, naming what to convert.

ComfyUI itself is not on PyPI: the load and forward checks through ComfyUI's loader are by hand
(DEVELOPERS.md); these tests hold the mapping to diffusers' converter and ComfyUI's key names.
"""
import pytest
import torch
from safetensors.torch import load_file

from quantkit.comfy_names import RenamedView
from quantkit.options import ConvertOptions
from quantkit.plan import plan_source
from quantkit.policy import Action
from quantkit.sources import open_source
from runs import run

diffusers = pytest.importorskip("diffusers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _cosmos(**extra):
    config = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=64, num_layers=2,
                  text_embed_dim=64, adaln_lora_dim=32, extra_pos_embed_type=None)
    config.update(extra)
    return diffusers.CosmosTransformer3DModel(**config)


# family -> (tiny diffusers model, the preset plan names, words of the variant it names)
FAMILIES = {
    "wan": (lambda: diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=256, ffn_dim=256, num_layers=2), "wan", "t2v"),
    "cosmos_predict2": (_cosmos, "cosmos", "Predict2"),
    "ltxv": (lambda: diffusers.LTXVideoTransformer3DModel(
        in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=64, cross_attention_dim=128,
        num_layers=2, caption_channels=64), "ltxv", ""),
    # adaln_single.* and transformer_blocks.N.attn1.* also read as LTX-Video's diffusers names
    "pixart": (lambda: diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=128, caption_channels=64, sample_size=16, use_additional_conditions=False), "pixart", ""),
    "hunyuan_video15": (lambda: diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=64, num_layers=2,
        num_refiner_layers=2, text_embed_dim=64, text_embed_2_dim=64, image_embed_dim=64, rope_axes_dim=(16, 24, 24)),
        "hunyuan_video", "1.5"),
    "flux2": (lambda: diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=64, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(16, 16, 16, 16)),
        "flux2", ""),
}


def _save(model, folder):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def folder(case):
        if case not in made:
            made[case] = _save(FAMILIES[case][0](), tmp_path_factory.mktemp(case) / "transformer")
        return made[case]
    return folder


@pytest.mark.parametrize("case", list(FAMILIES))
def test_plan_names_the_family_on_diffusers_names(folders, case):
    """Before: 'preset generic (no known architecture detected)' unless --format comfy."""
    result = run("plan", folders(case))
    assert result.exit_code == 0, result.output
    head = result.output[:1500]
    assert f"preset {FAMILIES[case][1]} (detected" in head and "preset generic" not in head, head
    assert FAMILIES[case][2] in head.splitlines()[1]


@pytest.mark.parametrize("recipe", ["mixed", "compact"])
@pytest.mark.parametrize("case", list(FAMILIES))
def test_the_diffusers_names_get_the_decisions_of_their_comfyui_names(folders, case, recipe):
    """Each diffusers tensor is planned as the ComfyUI tensor it becomes (q, k, v of one joined qkv alike)."""
    native = plan_source(str(folders(case)), ConvertOptions.from_strings(recipe=recipe)).plan
    comfy = plan_source(str(folders(case)), ConvertOptions.from_strings(recipe=recipe, format="comfy")).plan
    assert native.policy.name == comfy.policy.name == FAMILIES[case][1]
    by_name = {t.name: t.decision.action for t in native.tensors}
    with open_source(folders(case), names="comfyui") as view:
        assert isinstance(view, RenamedView)
        parts = view.parts
    for t in comfy.tensors:
        for source, _, _ in parts[t.name]:
            assert by_name[source] is t.decision.action, (t.name, source)
    assert native.count(Action.QUANTIZE) == comfy.count(Action.QUANTIZE) + sum(
        len(parts[t.name]) - 1 for t in comfy.tensors if t.decision.action is Action.QUANTIZE) > 0


def test_an_explicit_preset_and_the_comfy_formats_are_unchanged(folders):
    """Only 'auto' reaching 'generic' looks through ComfyUI's names; --preset generic stays generic."""
    result = run("plan", folders("wan"), "--preset", "generic")
    assert result.exit_code == 0 and "preset generic (chosen" in result.output, result.output[:500]


@pytest.mark.parametrize("fmt", ["comfy", "comfy-legacy"])
def test_cosmos_predict2_is_written_under_nvidias_names(folders, tmp_path, fmt):
    """Renames only (diffusers' converter is a rename table): every FP8 weight beside its scale, and the
    file, dequantized and put through diffusers' Cosmos converter, gives back every diffusers key."""
    out = tmp_path / "cosmos.safetensors"
    result = run("convert", folders("cosmos_predict2"), out, "--format", fmt)
    assert result.exit_code == 0, result.output
    assert "diffusers Cosmos Predict2 names written as ComfyUI's" in result.output
    stored = load_file(str(out))
    scale = ".weight_scale" if fmt == "comfy" else ".scale_weight"
    fp8 = [k for k, v in stored.items() if v.dtype in FP8 and k != "scaled_fp8"]
    assert fp8 and all(k[:-len(".weight")] + scale in stored for k in fp8)
    assert "x_embedder.proj.1.weight" in stored and "blocks.1.adaln_modulation_mlp.2.weight" in stored
    assert "t_embedder.1.linear_1.weight" in stored and "final_layer.adaln_modulation.2.weight" in stored
    assert not any(k.startswith(("transformer_blocks.", "patch_embed.", "time_embed.")) for k in stored)
    weights = {k: v for k, v in stored.items() if not k.endswith((scale, ".comfy_quant")) and k != "scaled_fp8"}
    back = sfu.convert_cosmos_transformer_checkpoint_to_diffusers(dict(weights))
    source = load_file(str(folders("cosmos_predict2") / "diffusion_pytorch_model.safetensors"))
    assert set(back) == set(source)
    for k, t in source.items():
        if back[k].dtype not in FP8:
            assert torch.equal(back[k], t), k


class _Unpopped(dict):
    """diffusers' Cosmos converter pops every key out of the checkpoint before it looks for the 1.0 marker
    (net.blocks.block1...), so it always applies the Predict2 table: a checkpoint that keeps its keys lets
    it see the marker."""

    def pop(self, key, *default):
        return self[key] if key in self else (default[0] if default else self[key])


@pytest.mark.parametrize("fmt", ["comfy", "comfy-legacy"])
def test_cosmos_1_is_written_under_nvidias_nested_names(tmp_path, fmt):
    """Cosmos 1.0 (diffusers: the learnable position embedding) is ComfyUI's other Cosmos model, its
    blocks nested blocks.blockN.blocks.{0,1,2} (self-attention, cross-attention, MLP): the keys of
    ComfyUI's own model (tests/family_keys.json) plus the position embedding, and back through diffusers'
    converter (which reads NVIDIA's names under ``net.``) the diffusers model, kept tensors bit for bit."""
    import json
    import pathlib
    want = json.loads((pathlib.Path(__file__).parent / "family_keys.json").read_text())["cosmos1"]
    folder = _save(_cosmos(extra_pos_embed_type="learnable", max_size=(8, 16, 16), rope_scale=(2.0, 1.0, 1.0)),
                   tmp_path / "transformer")
    out = tmp_path / "cosmos1.safetensors"
    result = run("convert", folder, out, "--format", fmt)
    assert result.exit_code == 0, result.output
    assert "diffusers Cosmos 1.0 names written as ComfyUI's" in result.output
    stored = load_file(str(out))
    scale = ".weight_scale" if fmt == "comfy" else ".scale_weight"
    fp8 = [k for k, v in stored.items() if v.dtype in FP8 and k != "scaled_fp8"]
    assert fp8 and all(k[:-len(".weight")] + scale in stored for k in fp8)
    weights = {k: v for k, v in stored.items() if not k.endswith((scale, ".comfy_quant")) and k != "scaled_fp8"}
    assert {k: list(v.shape) for k, v in weights.items() if not k.startswith("extra_pos_embedder.")} == want
    assert {k for k in weights if k.startswith("extra_pos_embedder.")} == {f"extra_pos_embedder.pos_emb_{a}" for a in "thw"}
    back = sfu.convert_cosmos_transformer_checkpoint_to_diffusers(_Unpopped({"net." + k: v for k, v in weights.items()}))
    source = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert set(back) == set(source)
    for k, t in source.items():
        if back[k].dtype not in FP8:
            assert torch.equal(back[k], t), k
    assert "preset cosmos (detected" in run("plan", folder).output


def test_hunyuan_video15_has_comfyuis_keys(tmp_path):
    """HunyuanVideo 1.5 under ComfyUI's names: the keys of ComfyUI's own model (tests/family_keys.json,
    built with ComfyUI's class); shapes too but the ByT5 mapper's, whose width diffusers fixes at 2048.
    diffusers has no single-file converter for 1.5: the forward through ComfyUI is checked by hand."""
    import json
    import pathlib
    want = json.loads((pathlib.Path(__file__).parent / "family_keys.json").read_text())["hunyuan_video15"]
    model = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=64, num_layers=2,
        num_refiner_layers=2, patch_size=2, text_embed_dim=64, text_embed_2_dim=64, image_embed_dim=64,
        rope_axes_dim=(16, 24, 24))
    folder = _save(model, tmp_path / "transformer")
    with open_source(folder, names="comfyui") as view:
        got = {n: list(i.shape) for n, i in view.tensors.items()}
        assert "written as ComfyUI's (HunyuanVideo)" in view.notes[-1]
    assert set(got) == set(want)
    assert {n: s for n, s in got.items() if not n.startswith("byt5_in.")} == \
           {n: s for n, s in want.items() if not n.startswith("byt5_in.")}
    stored = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "hv15.safetensors"
    assert run("convert", folder, out, "--format", "comfy", "--keep", "*").exit_code == 0
    written = load_file(str(out))
    half = stored["norm_out.linear.weight"].shape[0] // 2
    assert torch.equal(written["final_layer.adaLN_modulation.1.weight"],
                       torch.cat([stored["norm_out.linear.weight"][half:], stored["norm_out.linear.weight"][:half]]))
    assert torch.equal(written["double_blocks.1.img_attn.qkv.weight"], torch.cat(
        [stored[f"transformer_blocks.1.attn.to_{x}.weight"] for x in "qkv"]))
    assert torch.equal(written["byt5_in.fc3.weight"], stored["context_embedder_2.linear_3.weight"])


def test_hunyuan_dit_has_comfyuis_keys_and_tencents_order(tmp_path):
    """HunyuanDiT under Tencent's names, ComfyUI's model's keys and shapes (tests/family_keys.json);
    q, k, v joined in Wqkv, k and v in the cross-attention's kv_proj (ComfyUI reshapes them (3|2, heads,
    head_dim)), norm2 and norm3 trading places (Tencent's norm3 precedes the cross-attention), the final
    modulation's scale and shift halves swapped. No converter on PyPI: the forward is checked by hand."""
    import json
    import pathlib
    want = json.loads((pathlib.Path(__file__).parent / "family_keys.json").read_text())["hunyuan_dit"]
    model = diffusers.HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, patch_size=2, sample_size=32, hidden_size=128,
        num_layers=2, cross_attention_dim=64, cross_attention_dim_t5=64, pooled_projection_dim=64, text_len=8,
        text_len_t5=8, use_style_cond_and_image_meta_size=False)
    folder = _save(model, tmp_path / "transformer")
    with open_source(folder, names="comfyui") as view:
        assert {n: list(i.shape) for n, i in view.tensors.items()} == want
    out = tmp_path / "hydit.safetensors"
    assert run("convert", folder, out, "--format", "comfy", "--keep", "*").exit_code == 0
    got, src = load_file(str(out)), load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(got["blocks.1.attn1.Wqkv.weight"], torch.cat([src[f"blocks.1.attn1.to_{x}.weight"] for x in "qkv"]))
    assert torch.equal(got["blocks.1.attn2.kv_proj.bias"], torch.cat([src[f"blocks.1.attn2.to_{x}.bias"] for x in "kv"]))
    assert torch.equal(got["blocks.0.norm3.weight"], src["blocks.0.norm2.weight"])
    assert torch.equal(got["blocks.0.norm2.weight"], src["blocks.0.norm3.weight"])
    half = src["norm_out.linear.weight"].shape[0] // 2
    assert torch.equal(got["final_layer.adaLN_modulation.1.weight"],
                       torch.cat([src["norm_out.linear.weight"][half:], src["norm_out.linear.weight"][:half]]))
    result = run("convert", folder, tmp_path / "fp8.safetensors", "--format", "comfy-legacy")
    assert result.exit_code == 0 and "diffusers HunyuanDiT names written as ComfyUI's" in result.output


def test_ltx2_plan_names_the_family_though_no_comfy_file_is_written(tmp_path):
    """A diffusers LTX-2 transformer lacks the text connectors ComfyUI's LTX-2 model holds, so no comfy
    file is written of it (exit 2, naming the release to convert); plan names it all the same, through
    its release names (diffusers' LTX-2 converter inverted: it gives the diffusers model back)."""
    from quantkit.checkpoint import open_checkpoint
    from quantkit.comfy_names_video import ltx2_names
    model = diffusers.LTX2VideoTransformer3DModel(
        in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=64, cross_attention_dim=128,
        num_layers=1, caption_channels=64, audio_in_channels=16, audio_out_channels=16, audio_num_attention_heads=2,
        audio_attention_head_dim=32, audio_cross_attention_dim=64)
    folder = _save(model, tmp_path / "transformer")
    result = run("plan", folder)
    assert result.exit_code == 0 and "preset ltxv (detected LTX-2 (audio-video)" in result.output, result.output[:600]
    source = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    with open_checkpoint(folder) as checkpoint:
        table = ltx2_names(checkpoint.tensors)
    release = {new: source[parts[0][0]] for new, parts in table.items()}
    assert "audio_patchify_proj.weight" in release and "av_ca_a2v_gate_adaln_single.linear.weight" in release
    back = sfu.convert_ltx2_transformer_to_diffusers(dict(release))
    assert set(back) == set(source) and all(torch.equal(back[k], source[k]) for k in source)
    refused = run("convert", folder, tmp_path / "out.safetensors", "--format", "comfy")
    assert refused.exit_code == 2 and "connectors" in refused.output and not (tmp_path / "out.safetensors").exists()


def test_stable_cascade_attentions_are_comfyuis(tmp_path):
    """Stable Cascade keeps Stability's names but the attentions': ComfyUI holds attention.attn.to_q/k/v
    and attn.out_proj (it splits the release's in_proj on load). Joined back into in_proj, the written
    file goes through diffusers' Stable Cascade converter to the diffusers model, bit for bit."""
    model = diffusers.StableCascadeUNet(
        in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=64,
        block_out_channels=(64, 64), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2,
        clip_text_in_channels=32, clip_text_pooled_in_channels=32, clip_image_in_channels=32, clip_seq=4,
        kernel_size=3, dropout=(0.0, 0.0), self_attn=True, timestep_conditioning_type=("sca", "crp"),
        switch_level=(False,))
    folder = _save(model, tmp_path / "transformer")
    out = tmp_path / "cascade.safetensors"
    result = run("convert", folder, out, "--format", "comfy", "--keep", "*")
    assert result.exit_code == 0 and "diffusers Stable Cascade names written as ComfyUI's" in result.output
    written = load_file(str(out))
    assert "down_blocks.0.2.attention.attn.out_proj.weight" in written
    release = {}
    for k, v in written.items():
        head, sep, tail = k.partition(".attn.to_")
        if not sep:
            release[k] = v
        elif tail.startswith("q."):
            kind = tail[2:]
            release[f"{head}.attn.in_proj_{kind}"] = torch.cat([written[f"{head}.attn.to_{x}.{kind}"] for x in "qkv"])
    back = sfu.convert_stable_cascade_unet_single_file_to_diffusers(release)
    source = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert set(back) == set(source) and all(torch.equal(back[k], source[k]) for k in source)
