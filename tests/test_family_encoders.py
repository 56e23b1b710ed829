"""The diffusion families' text encoders (quantkit.presets.family_encoders, quantkit.comfy_encoder_names):
UMT5 (Wan), Qwen2.5-VL (Qwen-Image, HunyuanVideo 1.5), Qwen3 (Z-Image), Mistral-Small 3 (FLUX.2),
Gemma 3 (LTX-2), LLaVA-Llama 3 (HunyuanVideo 1.0).

Each is built tiny with transformers' own classes and saved with ``save_pretrained``; the tests check
detection and variant (transformers' names, ComfyUI's names, real shapes by hand), what the plan keeps,
convert -> validate --against in the comfy format under ComfyUI's names, and the converted encoder's
hidden states against the BF16 one. Golden files: ``tests/golden/preset_family_encoder_<name>.txt``
(regenerate with ``QUANTKIT_UPDATE_GOLDEN=1 pytest tests/test_family_encoders.py -k golden``).
"""
from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantkit.policy import Action, Policy
from quantkit.presets import resolve
from quantkit.reader import TensorInfo
from quantkit.dtypes import BF16
from quantkit.readback import load_dequantized
from quantkit.sources import open_source
from runs import run

transformers = pytest.importorskip("transformers")

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("QUANTKIT_UPDATE_GOLDEN") == "1"
Q = Action.QUANTIZE


def _text(**kw):
    out = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    out.update(kw)
    return out


def _build(name):
    t = transformers
    torch.manual_seed(0)
    if name == "umt5":
        return t.UMT5EncoderModel(t.UMT5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                               num_heads=4, feed_forward_proj="gated-gelu"))
    if name == "qwen3":
        return t.Qwen3Model(t.Qwen3Config(**_text()))
    if name == "qwen25_vl":
        return t.Qwen2_5_VLForConditionalGeneration(t.Qwen2_5_VLConfig(
            text_config=_text(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               fullatt_block_indexes=[1], window_size=28, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2)))
    if name == "gemma3":
        return t.Gemma3ForConditionalGeneration(t.Gemma3Config(
            text_config=_text(), mm_tokens_per_image=4,
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=28, patch_size=14)))
    if name == "mistral3":
        return t.Mistral3ForConditionalGeneration(t.Mistral3Config(
            text_config=dict(model_type="mistral", **_text()),
            vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, image_size=28, patch_size=14, head_dim=16)))
    assert name == "llava"
    return t.LlavaForConditionalGeneration(t.LlavaConfig(
        text_config=dict(model_type="llama", **_text()),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)))


# name -> (preset, variant under transformers' names, preset under ComfyUI's names)
CASES = {
    "umt5": ("umt5", "UMT5 encoder (d_model 64, 2 blocks)", "umt5"),
    "qwen3": ("qwen3", "Qwen3 (hidden 64, 2 layers)", "qwen3"),
    "qwen25_vl": ("qwen25_vl", "Qwen2.5-VL (hidden 64, 2 layers) (with vision tower)", "qwen25_vl"),
    "gemma3": ("gemma3", "Gemma 3 (hidden 64, 2 layers) (with vision tower)", "gemma3"),
    # Without its tower (ComfyUI loads none) a tiny Mistral/Llama decoder is told apart by size only, as
    # ComfyUI's detect_te_model does (5120 wide; a 128k vocabulary): at this size it reads as llm, same rules.
    "mistral3": ("mistral3", "Mistral-Small 3 (hidden 64, 2 layers) (with vision tower)", "llm"),
    "llava": ("llama3", "LLaVA-Llama 3 (hidden 64, 2 layers) (with vision tower)", "llm"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    out = {}
    for name in CASES:
        _build(name).to(torch.bfloat16).save_pretrained(root / name)
        out[name] = root / name
    return out


def _resolve(folder, names=None):
    with open_source(folder, names=names) as src:
        preset, note = resolve("auto", src.tensors)
        policy = Policy().with_preset(preset.name, preset.rules(src.tensors))
        return preset, note, {k: policy.decide(k, i.shape, i.dtype) for k, i in src.tensors.items()}, list(src.notes)


@pytest.mark.parametrize("name", CASES)
def test_detected_with_variant_under_both_namings(folders, name):
    preset, variant, comfy_preset = CASES[name]
    p, note, _, _ = _resolve(folders[name])
    assert p.name == preset and f"detected {variant}" in note
    assert _resolve(folders[name], "comfyui")[0].name == comfy_preset


@pytest.mark.parametrize("name", CASES)
def test_keeps_embeddings_heads_norms_and_vision_towers(folders, name):
    _, _, got, _ = _resolve(folders[name])
    quantized = {k for k, d in got.items() if d.action is Q}
    assert quantized, name
    for k in quantized:
        assert not any(s in k for s in ("embed", "lm_head", "norm", "visual", "vision", "projector", "shared",
                                        "relative_attention_bias", "DenseReluDense.wo")), k
        assert k.endswith(".weight")
    assert any("q_proj" in k or ".q." in k for k in quantized)


@pytest.mark.parametrize("name", CASES)
def test_golden_quantized_keys(folders, name):
    got = sorted(k for k, d in _resolve(folders[name])[2].items() if d.action is Q)
    path = GOLDEN_DIR / f"preset_family_encoder_{name}.txt"
    text = "".join(k + "\n" for k in got)
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert path.read_text() == text, f"{name}: regenerate with QUANTKIT_UPDATE_GOLDEN=1 if on purpose"


def test_plain_t5_and_llama_keep_their_presets():
    from tiny_models import build
    for model, want in (("t5_encoder", "t5_encoder"), ("llama", "llm")):
        infos = {k: TensorInfo(k, BF16, tuple(t.shape), 0, 0) for k, t in build(model).state_dict().items()}
        assert resolve("auto", infos)[0].name == want


def _infos(shapes):
    return {k: TensorInfo(k, BF16, tuple(s), 0, 0) for k, s in shapes.items()}


def _decoder(h, n, vocab, q_out=None, kv=1024, bias=False, qk_norm=False, gemma=False, prefix="model."):
    out = {prefix + "embed_tokens.weight": (vocab, h), prefix + "norm.weight": (h,)}
    for i in (0, n - 1):
        b = f"{prefix}layers.{i}."
        out.update({b + "self_attn.q_proj.weight": (q_out or h, h), b + "self_attn.k_proj.weight": (kv, h),
                    b + "self_attn.o_proj.weight": (h, q_out or h), b + "input_layernorm.weight": (h,),
                    b + "post_attention_layernorm.weight": (h,)})
        if bias:
            out[b + "self_attn.k_proj.bias"] = (kv,)
        if qk_norm:
            out.update({b + "self_attn.q_norm.weight": (128,), b + "self_attn.k_norm.weight": (128,)})
        if gemma:
            out.update({b + "pre_feedforward_layernorm.weight": (h,), b + "post_feedforward_layernorm.weight": (h,)})
    return out


def test_variants_of_the_published_encoders_under_comfyui_names():
    qwen_vl = _decoder(3584, 28, 152064, kv=512, bias=True) | {"visual.blocks.0.attn.qkv.weight": (3840, 1280),
                                                               "visual.merger.mlp.0.weight": (5120, 5120)}
    gemma = _decoder(3840, 48, 262208, q_out=4096, kv=2048, qk_norm=True, gemma=True) | {
        "vision_model.embeddings.patch_embedding.weight": (1152, 3, 14, 14),
        "multi_modal_projector.mm_input_projection_weight": (1152, 3840)}
    umt5 = {"shared.weight": (256384, 4096)}
    for i in range(24):
        umt5[f"encoder.block.{i}.layer.0.SelfAttention.q.weight"] = (4096, 4096)
        umt5[f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"] = (32, 64)
        umt5[f"encoder.block.{i}.layer.1.DenseReluDense.wo.weight"] = (4096, 10240)
    cases = {
        "UMT5-XXL encoder": umt5,
        "Qwen2.5-VL 7B (with vision tower)": qwen_vl,
        "Qwen3 4B": _decoder(2560, 36, 151936, q_out=4096, qk_norm=True),
        "Gemma 3 12B (with vision tower)": gemma,
        "Mistral-Small 3 24B (text only)": _decoder(5120, 40, 131072, q_out=4096),
        "Mistral-Small 3 24B (pruned to 30 layers) (text only)": _decoder(5120, 30, 131072, q_out=4096),
        "Llama 3 8B": _decoder(4096, 32, 128320),
    }
    for variant, shapes in cases.items():
        preset, note = resolve("auto", _infos(shapes))
        assert f"detected {variant}" in note, (variant, note)


@pytest.mark.parametrize("name", CASES)
def test_comfy_convert_validates_and_keeps_hidden_states(folders, name, tmp_path):
    src = folders[name]
    out = tmp_path / "out.safetensors"
    assert run("convert", src, out, "--format", "comfy", "-q").exit_code == 0
    result = run("validate", out, "--against", src)
    assert result.exit_code == 0, result.output
    legacy = tmp_path / "legacy.safetensors"      # the scaled_fp8 marker ComfyUI's encoder loaders read
    assert run("convert", src, legacy, "--format", "comfy-legacy", "-q").exit_code == 0
    assert run("validate", legacy, "--against", src).exit_code == 0
    with safe_open(str(legacy), "pt") as f:
        assert "scaled_fp8" in f.keys() and set(f.keys()) - {"scaled_fp8"} >= set(load_file(str(out)).keys()) - {
            k for k in load_file(str(out)) if k.endswith(("comfy_quant", "weight_scale"))}
    state = load_dequantized(str(out), torch.float32)
    # ComfyUI's names: the decoder under model., no lm_head, Mistral's and LLaVA's towers dropped.
    if name != "umt5":
        assert "model.layers.0.self_attn.q_proj.weight" in state
        assert not any("lm_head" in k or "language_model" in k for k in state)
    if name in ("mistral3", "llava"):
        assert not any("vision" in k or "projector" in k for k in state)
    if name == "gemma3":
        assert "multi_modal_projector.mm_input_projection_weight" in state
        assert any(k.startswith("vision_model.") for k in state)
    if name == "qwen25_vl":
        assert any(k.startswith("visual.blocks.") for k in state)
    # Back to transformers' saved names (tensors ComfyUI does not load: the originals) and run both.
    with open_source(src, names="comfyui") as view:
        back = {parts[0][0]: state[new] for new, parts in getattr(view, "parts", {}).items()} or state
    original = load_file(str(src / "model.safetensors"))
    quant_dir = tmp_path / "quantized"
    shutil.copytree(src, quant_dir)
    save_file({k: back.get(k, v.float()).to(torch.bfloat16).contiguous() for k, v in original.items()},
              str(quant_dir / "model.safetensors"), metadata={"format": "pt"})
    cls = type(_build(name))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))

    def hidden(folder):
        model = cls.from_pretrained(folder, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            o = model(input_ids=ids, output_hidden_states=True)
        return (o.last_hidden_state if getattr(o, "last_hidden_state", None) is not None else o.hidden_states[-1])

    a, b = hidden(src).flatten(), hidden(quant_dir).flatten()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert 0.99 <= cos < 0.999999, cos       # close, and not the unquantized weights by mistake


def test_a_bare_decoder_written_under_comfyui_names_runs_in_its_own_model(folders, tmp_path):
    """A transformers Qwen3Model (layers.*) is written as ComfyUI's model.*: the runtime maps the names back
    onto the model it was converted from, so --model-output runs it (the prefix is undone, nothing else)."""
    out = tmp_path / "qwen3.safetensors"
    assert run("convert", folders["qwen3"], out, "--format", "comfy", "-q").exit_code == 0
    result = run("validate", out, "--against", folders["qwen3"], "--model-output", "-q")
    assert result.exit_code == 0 and "PASS" in result.output, result.output
