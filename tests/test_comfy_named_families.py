"""Every diffusion family ComfyUI runs (SDXL aside: ComfyUI tells it by full-size block counts), under ComfyUI's own names, as ComfyUI's loader builds it: detection names
the family and variant, default conversion to ``comfy`` and ``comfy-legacy`` puts every FP8 weight in a layer
ComfyUI loads as quantized, with its scale where ComfyUI's loader reads it.

``tests/comfy_loader_families.json`` holds, per family, what ComfyUI (upstream commit 6db4fa2) built when its
own loader (``comfy.sd.load_diffusion_model``) read a tiny random model of that family: the model_config class
it detected, every key and shape of the state dict, and the layers it builds as ``nn.Linear``. Its
mixed-precision ops (``comfy/ops.py`` ``mixed_precision_ops``) read an FP8 weight with its scale in a Linear,
an Embedding and the MoE experts; a Conv or a bare Parameter holding FP8 (HiDream's MoEGate router) is used
without it. Every preset puts its FP8 weights in Linears only, which is what is checked here.
The same models, converted with default options and loaded back by that ComfyUI on CPU, gave the figures
in docs/presets.md ("Checked through ComfyUI's loader"); how to repeat that by hand is in docs/testing.md.
No test here imports ComfyUI: what its loader does to a file is restated in test_format_comfy.py.
"""
from __future__ import annotations

import functools
import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantkit.dtypes import BF16
from quantkit.policy import Action, Policy
from quantkit.presets import GENERIC, resolve
from quantkit.reader import TensorInfo
from runs import run, write_random_source
from test_format_comfy import comfy_convert_old_quants, comfy_mixed_ops_load

ROOT = pathlib.Path(__file__).parent
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

# case -> (preset, variant in the detection line); '' where the preset names none.
FAMILIES = {
    "wan21_t2v": ("wan", "Wan 2.1/2.2 t2v"), "wan21_i2v": ("wan", "Wan 2.1 i2v"),
    "wan22_i2v": ("wan", "Wan 2.2 14B i2v"), "wan22_5b": ("wan", "Wan 2.2 5B TI2V"),
    "wan_vace": ("wan", "Wan 2.1/2.2 VACE"),
    "hunyuan_video": ("hunyuan_video", "HunyuanVideo 1.0"), "hunyuan_video15": ("hunyuan_video", "HunyuanVideo 1.5"),
    "ltxv": ("ltxv", "LTX-Video"), "ltx2": ("ltxv", "LTX-2 (audio-video)"),
    "flux1": ("flux", ""), "flux2": ("flux2", "FLUX.2"), "chroma": ("chroma", "Chroma"),
    "lumina2": ("lumina2", "Lumina 2"), "zimage": ("lumina2", "Z-Image"), "hidream": ("hidream", "HiDream"),
    "cosmos1": ("cosmos", "Cosmos 1.0"), "cosmos_predict2": ("cosmos", "Cosmos Predict2"),
    "kandinsky5": ("kandinsky5", "Kandinsky 5"), "auraflow": ("auraflow", "AuraFlow"),
    "pixart_sigma": ("pixart", "PixArt-Sigma"), "hunyuan_dit": ("hunyuan_dit", "HunyuanDiT"),
    "hunyuan3d2": ("hunyuan3d", "Hunyuan3D 2.0"), "mochi": ("mochi", "Mochi 1"),
    "ace": ("ace_step", "ACE-Step 1.0"), "ace15": ("ace_step", "ACE-Step 1.5"),
    "sd15": ("unet", ""), "sd35": ("sd3", ""), "qwen_image": ("qwen_image", ""),
    "hunyuan_video_i2v": ("hunyuan_video", "HunyuanVideo 1.0 i2v"),
    "hunyuan_skyreels": ("hunyuan_video", "HunyuanVideo 1.0 i2v (SkyReels)"),
    "hunyuan_image21": ("hunyuan_video", "HunyuanImage 2.1"), "flux_schnell": ("flux", ""),
    "cosmos1_i2v": ("cosmos", "Cosmos 1.0 i2v"), "cosmos2_i2v": ("cosmos", "Cosmos Predict2 i2v"),
    "chroma_radiance": ("chroma", "Chroma Radiance"), "anima": ("cosmos", "Cosmos Predict2 (Anima)"),
}
# The model_config class ComfyUI's loader detected for each (Wan 2.2 14B shares 2.1's classes).
COMFY_CLASSES = {
    "wan21_t2v": "WAN21_T2V", "wan21_i2v": "WAN21_I2V", "wan22_i2v": "WAN21_T2V", "wan22_5b": "WAN22_T2V",
    "wan_vace": "WAN21_Vace", "hunyuan_video": "HunyuanVideo", "hunyuan_video15": "HunyuanVideo15", "ltxv": "LTXV",
    "ltx2": "LTXAV", "flux1": "Flux", "flux2": "Flux2", "chroma": "Chroma", "lumina2": "Lumina2", "zimage": "ZImage",
    "hidream": "HiDream", "cosmos1": "CosmosT2V", "cosmos_predict2": "CosmosT2IPredict2", "kandinsky5": "Kandinsky5",
    "auraflow": "AuraFlow", "pixart_sigma": "PixArtSigma", "hunyuan_dit": "HunyuanDiT", "hunyuan3d2": "Hunyuan3Dv2",
    "mochi": "GenmoMochi", "ace": "ACEStep", "ace15": "ACEStep15", "sd15": "SD15", "sd35": "SD3",
    "qwen_image": "QwenImage", "hunyuan_video_i2v": "HunyuanVideoI2V", "hunyuan_skyreels": "HunyuanVideoSkyreelsI2V",
    "hunyuan_image21": "HunyuanImage21", "flux_schnell": "FluxSchnell", "cosmos1_i2v": "CosmosI2V",
    "cosmos2_i2v": "CosmosI2VPredict2", "chroma_radiance": "ChromaRadiance", "anima": "Anima",
}
# ACE-Step 1.0's lyric encoder (85M parameters) and Anima's LLM adapter (136M) are full size in ComfyUI's
# classes whatever the config: their conversions run in a test of their own.
BIG = {"ace", "anima"}


@functools.lru_cache(maxsize=None)
def families() -> dict:
    return json.loads((ROOT / "comfy_loader_families.json").read_text())


def infos(case: str, prefix: str = "") -> dict[str, TensorInfo]:
    return {prefix + k: TensorInfo(prefix + k, BF16, tuple(s), 0, 0) for k, s in families()[case]["keys"].items()}


def quantized_stems(case: str, keep_attention: bool) -> set[str]:
    tensors = infos(case)
    preset, _ = resolve("auto", tensors)
    policy = Policy(keep_attention=keep_attention).with_preset(preset.name, preset.rules(tensors))
    return {k[:-len(".weight")] for k, i in tensors.items()
            if policy.decide(k, i.shape, i.dtype).action is Action.QUANTIZE}


def test_the_table_covers_every_family_comfyui_built():
    assert set(families()) == set(FAMILIES) == set(COMFY_CLASSES)
    assert {c: f["comfy_class"] for c, f in families().items()} == COMFY_CLASSES


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_detection_names_the_family_and_its_variant(case, prefix):
    tensors = infos(case, prefix)
    preset, note = resolve("auto", tensors)
    name, variant = FAMILIES[case]
    assert preset is not GENERIC and preset.name == name, note
    assert preset.variant(tensors) == variant, note
    assert note.startswith(f"preset {name} (detected{' ' + variant if variant else ''}"), note


def test_variants_comfyui_tells_apart_are_named_apart():
    """HunyuanImage 2.1 was named 'HunyuanVideo 1.0 i2v', SkyReels and HunyuanVideo's i2v alike, Cosmos'
    i2v models as their t2v ones."""
    named = {case: resolve("auto", infos(case))[0].variant(infos(case)) for case in FAMILIES}
    for group in (("hunyuan_video", "hunyuan_video_i2v", "hunyuan_skyreels", "hunyuan_image21", "hunyuan_video15"),
                  ("cosmos1", "cosmos1_i2v", "cosmos_predict2", "cosmos2_i2v")):
        assert len({named[c] for c in group}) == len(group), {c: named[c] for c in group}
        assert len({COMFY_CLASSES[c] for c in group}) == len(group)


@pytest.mark.parametrize("recipe", ["mixed", "compact"])
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_every_quantized_weight_is_a_layer_comfyui_builds_as_linear(case, recipe):
    """ComfyUI reads an FP8 weight with its scale only in a Linear; HiDream's MoE routers (a bare Parameter in
    ComfyUI's MoEGate) quantized by the generic policy cost cosine 0.965 there."""
    got = quantized_stems(case, keep_attention=recipe == "mixed")
    assert got, "nothing quantized"
    assert got <= set(families()[case]["linear"]), sorted(got - set(families()[case]["linear"]))


def write_source(case: str, path: pathlib.Path) -> pathlib.Path:
    return write_random_source(families()[case]["keys"], path, case)


def manifest_quantized(out: pathlib.Path) -> set[str]:
    manifest = json.loads(out.with_name(out.name[:-len(".safetensors")] + ".quantkit.json").read_text())
    return {k[:-len(".weight")] for k, action, *_ in manifest["conversion"]["decisions"] if action == "quantize"}


def comfyui_view(path: pathlib.Path, linear: set[str]):
    """What ComfyUI's loader makes of ``path``: old scaled_fp8 files converted, then the Linear layers loaded
    by its mixed-precision ops. Returns (quantized weights by layer, layer configs, every other tensor)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    sd = comfy_convert_old_quants(load_file(str(path)), "", metadata)
    own = {k: v for k, v in sd.items() if k.rpartition(".")[0] in linear}
    weights, configs, _, rest = comfy_mixed_ops_load(own, torch.float32)
    others = {k: v for k, v in sd.items() if k not in own}
    return weights, configs, {**rest, **others}


def check_conversion(case: str, tmp_path: pathlib.Path) -> None:
    src = write_source(case, tmp_path / f"{case}.safetensors")
    source = load_file(str(src))
    linear = set(families()[case]["linear"])
    for fmt in ("comfy", "comfy-legacy"):
        out = tmp_path / f"{case}.{fmt}.safetensors"
        result = run("convert", src, out, "--format", fmt, "-q")
        assert result.exit_code == 0, result.output
        written = manifest_quantized(out)
        assert written == quantized_stems(case, keep_attention=True), fmt
        raw = load_file(str(out))
        if fmt == "comfy":     # the scale and layer config beside each FP8 weight, where ComfyUI reads them
            assert all(raw[s + ".weight_scale"].dtype == torch.float32 and s + ".comfy_quant" in raw for s in written)
        else:
            assert raw["scaled_fp8"].dtype == torch.float8_e4m3fn
            assert all(raw[s + ".scale_weight"].dtype == torch.float32 for s in written)
        weights, configs, rest = comfyui_view(out, linear)
        assert set(configs) == written, fmt
        assert all(c["format"] == "float8_e4m3fn" for c in configs.values())
        lost = sorted(k for k, v in rest.items() if v.dtype in FP8)
        assert not lost, f"{fmt}: FP8 tensors ComfyUI would use without their scale: {lost}"
        assert not [k for k in rest if k.endswith((".weight_scale", ".comfy_quant", ".scale_weight"))]
        # ComfyUI tells the family apart by key names: every source key is still there, unrenamed.
        assert {k for k in raw if not k.endswith((".weight_scale", ".comfy_quant", ".scale_weight"))} \
            - {"scaled_fp8"} == set(source)
        for stem in written:
            w, ref = weights[stem + ".weight"].dequantize().float(), source[stem + ".weight"].float()
            cos = torch.nn.functional.cosine_similarity(w.flatten(), ref.flatten(), dim=0)
            assert cos > 0.999, f"{fmt} {stem}: cosine {cos:.5f}"


@pytest.mark.parametrize("case", sorted(set(FAMILIES) - BIG))
def test_default_conversion_loads_as_comfyui_reads_it(case, tmp_path):
    check_conversion(case, tmp_path)


def test_default_conversion_loads_as_comfyui_reads_it_full_size_parts(tmp_path):
    for case in sorted(BIG):
        check_conversion(case, tmp_path)


def test_hunyuan_video_15_with_a_unit_patch_is_not_taken_for_the_image_refiner():
    """HunyuanVideo 1.5's img_in is a [1, 1, 1] patch, as HunyuanImage 2.1's refiner's: ComfyUI tries 1.5 (its
    vision input) before the refiner, and so does the variant."""
    def with_patch(case, patch, drop=()):
        tensors = {k: i for k, i in infos(case).items() if not k.startswith(drop)} if drop else infos(case)
        w = tensors["img_in.proj.weight"]
        tensors["img_in.proj.weight"] = TensorInfo(w.name, BF16, tuple(w.shape[:2]) + patch, 0, 0)
        return resolve("auto", tensors)[0].variant(tensors)
    assert with_patch("hunyuan_video15", (1, 1, 1)) == "HunyuanVideo 1.5"
    assert with_patch("hunyuan_image21", (1, 1, 1)) == "HunyuanImage 2.1 refiner"
    assert with_patch("hunyuan_video", (1, 2, 2)) == "HunyuanVideo 1.0"
