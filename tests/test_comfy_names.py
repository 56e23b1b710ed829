"""A diffusers FLUX.1 / SD3 transformer or UNet converted for ComfyUI is written under BFL's / SAI's /
LDM's key names.

The authority on what each original key holds is diffusers' own converters from the original
releases (``convert_flux_transformer_checkpoint_to_diffusers``, ``convert_sd3_transformer_
checkpoint_to_diffusers``, ``convert_ldm_unet_checkpoint``: what ``from_single_file`` runs on a
ComfyUI / BFL / SAI / LDM file). The
FLUX one hard-codes FLUX.1's width (3072) to split ``single_blocks.N.linear1``;
``diffusers_from_bfl`` gives it the tiny model's width, and changes nothing else.
"""
import json
import random
from unittest import mock

import pytest
import tiny_models
import torch
from safetensors.torch import load_file, save_file
from test_presets import MMDIT, bfl_flux

from quantkit.checkpoint import open_checkpoint
from quantkit.sources import open_source
from quantkit.comfy_names import flux_to_bfl, is_diffusers_flux
from quantkit.readback import load_dequantized
from quantkit.validation import validate
from runs import run

sfu = pytest.importorskip("diffusers.loaders.single_file_utils")



def diffusers_from_bfl(state: dict) -> dict:
    real_split = torch.split

    def split(t, sizes, dim=0):
        if tuple(sizes) == (3072, 3072, 3072, 12288):      # linear1 = q, k, v (h rows each), mlp (4h rows)
            h = t.shape[0] // 7
            sizes = (h, h, h, 4 * h)
        return real_split(t, sizes, dim)
    with mock.patch.object(sfu.torch, "split", split):
        return sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(state))


def diffusers_from_sai(state: dict) -> dict:
    return sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(state))


def diffusers_from_ldm(name):
    config = dict(tiny_models.build(name).config)

    def convert(state: dict) -> dict:
        return sfu.convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in state.items()}, config)
    return convert


BACK = {"flux": diffusers_from_bfl, "sd3": diffusers_from_sai,
        "unet_sd15": diffusers_from_ldm("unet_sd15"), "unet_sdxl": diffusers_from_ldm("unet_sdxl")}


# The tiny models (tests/tiny_models.py): FLUX.1 with 2 double and 2 single blocks and guidance;
# SD3.5-medium-like (dual attention in block 0, qk norms, the last block context_pre_only);
# SD1.5-like UNet (conv proj_in/out); SDXL-like UNet (linear proj_in/out, text_time add-embedding).
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> a tiny diffusers model folder of it, BF16 (as releases are), and the model; built once."""
    made = {}

    def folder(name):
        if name not in made:
            path = tmp_path_factory.mktemp(f"{name}-diffusers") / "transformer"
            model = tiny_models.build(name)
            model.save_pretrained(path, safe_serialization=True)
            save_file(tiny_models.state_dict_tensors(model), str(path / "diffusion_pytorch_model.safetensors"))
            made[name] = path, model
        return made[name]
    return folder


@pytest.fixture(scope="module")
def flux(folders):
    return folders("flux")


@pytest.fixture(scope="module")
def sd3(folders):
    return folders("sd3")


@pytest.fixture(params=list(BACK))
def model(request, folders):
    return request.param, folders(request.param)[0]


def view_tensors(folder) -> dict:
    with open_source(folder, names="comfyui") as ckpt:
        return {n: ckpt.read_tensor(i).clone() for n, i in ckpt.tensors.items()}


def test_names_are_bfls_flux_names(flux):
    folder, _ = flux
    got = view_tensors(folder)
    assert set(got) == set(bfl_flux(double=2, single=2))          # the hand-written FLUX.1-dev key list


def test_names_are_sais_mmdit_names(sd3):
    """The hand-written SD3.5-medium key list (3 blocks) has the tiny model's two kinds of block:
    block 0 (dual attention) and the last, context_pre_only one (its block 2, here block 1)."""
    folder, _ = sd3
    got = view_tensors(folder)
    expected = {k.replace("joint_blocks.2.", "joint_blocks.1.") for k in MMDIT if not k.startswith("joint_blocks.1.")}
    assert expected <= set(got), expected - set(got)
    assert {k.replace(".bias", ".weight") for k in got} - expected <= {
        f"joint_blocks.{n}.{b}.{a}.{q}.weight" for n in (0, 1) for b in ("x_block", "context_block")
        for a in ("attn", "attn2") for q in ("ln_q", "ln_k")}


def test_diffusers_own_converter_gives_back_the_source_bit_for_bit(model):
    name, folder = model
    source = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    back = BACK[name](view_tensors(folder))
    assert set(back) == set(source)
    for k, t in source.items():
        assert torch.equal(back[k], t), k


def test_reads_across_part_boundaries_at_any_offset(flux):
    """The joined tensors stream in chunks: every byte range reads what the concatenation holds."""
    folder, _ = flux
    source = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    rng = random.Random(0)
    with open_checkpoint(folder) as plain:
        table = flux_to_bfl(plain.tensors)
    with open_source(folder, names="comfyui") as ckpt:
        for name in ("double_blocks.1.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                     "single_blocks.0.linear1.bias", "final_layer.adaLN_modulation.1.weight"):
            info = ckpt.tensors[name]
            whole = ckpt.read_tensor(info).reshape(-1).view(torch.uint8)
            if name.startswith("final_layer"):
                w = source["norm_out.linear.weight"]
                expected = torch.cat([w[w.shape[0] // 2:], w[: w.shape[0] // 2]])
            else:
                expected = torch.cat([source[p][r0:r1] for p, r0, r1 in table[name]])
            assert torch.equal(whole, expected.reshape(-1).view(torch.uint8)), name
            for _ in range(50):
                a = rng.randrange(info.nbytes)
                b = rng.randrange(a, info.nbytes + 1)
                buf = torch.empty(b - a, dtype=torch.uint8)
                ckpt.read_into(info, a, buf.numpy())
                assert torch.equal(buf, whole[a:b]), (name, a, b)


QKV = {"flux": ("double_blocks.0.img_attn.qkv", "BFL"), "sd3": ("joint_blocks.0.x_block.attn.qkv", "SAI"),
       "unet_sd15": (None, "LDM"), "unet_sdxl": (None, "LDM")}


def test_convert_for_comfyui_then_back_through_diffusers_runs_the_model(model, tmp_path):
    """The comfy file, dequantized and renamed by diffusers, runs the model within FP8 error; a
    joined weight (q, k, v) has one scale over all its parts."""
    name, folder = model
    out = tmp_path / f"{name}-comfy.safetensors"
    result = run("convert", folder, out, "--format", "comfy", "--recipe", "compact")   # q/k/v joined
    assert result.exit_code == 0, result.output
    qkv, names = QKV[name]
    assert f"written as ComfyUI's ({names})" in result.output
    stored = load_file(str(out))
    source = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert any(k.endswith(".comfy_quant") for k in stored)
    assert set(stored) & set(source) <= {"context_embedder.weight", "context_embedder.bias"}   # SAI's names too
    if qkv is not None:
        absmax = max(float(source[f"transformer_blocks.0.attn.to_{p}.weight"].float().abs().max()) for p in "qkv")
        assert float(stored[qkv + ".weight_scale"]) == pytest.approx(absmax / 448, rel=1e-6)

    back = BACK[name]({k: v.float() for k, v in load_dequantized(str(out), dtype=torch.float32).items()})
    quantized = tiny_models.build(name)
    quantized.load_state_dict(back, strict=True)
    reference = tiny_models.build(name)
    reference.load_state_dict({k: v.float() for k, v in source.items()}, strict=True)
    y_ref = tiny_models.forward(name, reference)
    y_q = tiny_models.forward(name, quantized)
    rel = float((y_q - y_ref).norm() / y_ref.norm())
    assert rel < 0.02, rel

    report = validate(str(out), str(folder), min_sqnr=30)
    assert report.ok, report.failures
    manifest = json.loads(out.with_name(f"{name}-comfy.quantkit.json").read_text())
    assert manifest["source"]["names"] == "comfyui"


def test_legacy_format_renames_too(flux, tmp_path):
    folder, _ = flux
    out = tmp_path / "flux-legacy.safetensors"
    assert run("convert", folder, out, "--format", "comfy-legacy").exit_code == 0
    stored = load_file(str(out))
    assert "scaled_fp8" in stored and "single_blocks.1.linear1.scale_weight" in stored
    assert validate(str(out), str(folder)).ok


def test_other_formats_keep_the_diffusers_names(flux, tmp_path):
    folder, _ = flux
    out = tmp_path / "flux-native.safetensors"
    assert run("convert", folder, out).exit_code == 0
    assert "transformer_blocks.0.attn.to_q.weight" in load_file(str(out))


def test_a_key_without_a_bfl_name_is_refused_by_name(flux, tmp_path):
    folder, _ = flux
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    tensors["transformer_blocks.0.attn.lora_A.weight"] = torch.zeros(4, 32, dtype=torch.bfloat16)
    src = tmp_path / "flux-extra.safetensors"
    save_file(tensors, str(src))
    assert is_diffusers_flux(tensors)
    result = run("convert", src, tmp_path / "out.safetensors", "--format", "comfy")
    assert result.exit_code == 2
    assert "transformer_blocks.0.attn.lora_A.weight" in result.output and "--format native" in result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_a_missing_part_is_refused_by_name(flux, tmp_path):
    folder, _ = flux
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del tensors["transformer_blocks.1.attn.add_k_proj.weight"]
    src = tmp_path / "flux-missing.safetensors"
    save_file(tensors, str(src))
    result = run("convert", src, tmp_path / "out.safetensors", "--format", "comfy")
    assert result.exit_code == 2 and "transformer_blocks.1.attn.add_k_proj.weight" in result.output


@pytest.mark.parametrize("name", ["flux", "sd3", "unet_sdxl"])
def test_model_output_of_a_renamed_output_runs_in_the_source_architecture(folders, tmp_path, name):
    """validate --model-output renames the comfy file's tensors back (rows split, halves swapped
    back) and runs them in the diffusers model; a wrong scale on a joined layer fails at the output."""
    folder, _ = folders(name)
    out = tmp_path / f"{name}-comfy.safetensors"
    assert run("convert", folder, out, "--format", "comfy", "--recipe", "compact").exit_code == 0
    result = run("validate", out, "--against", folder, "--model-output", "--min-output-sqnr", "30")
    assert result.exit_code == 0, result.output
    report = validate(str(out), str(folder), model_output=True)
    assert report.ok and report.model_output["sqnr"] >= 30, report.model_output

    tensors = load_file(str(out))
    layer = {"flux": "double_blocks.0.img_attn.qkv", "sd3": "joint_blocks.0.x_block.attn.qkv",
             "unet_sdxl": next(k[: -len(".comfy_quant")] for k in tensors if k.endswith(".comfy_quant"))}[name]
    tensors[layer + ".weight_scale"] = tensors[layer + ".weight_scale"] * 8
    save_file(tensors, str(out), metadata={"quantkit.format": "comfy"})
    damaged = validate(str(out), str(folder), check_hash=False, model_output=True, min_output_sqnr=30)
    assert not damaged.ok and damaged.model_output["sqnr"] < 30, damaged.model_output


def test_plan_shows_what_each_joined_tensor_is_made_of(flux, tmp_path):
    folder, _ = flux
    result = run("plan", folder, "--format", "comfy", "--json", tmp_path / "plan.json")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("single_blocks.0.linear1.weight "))
    assert line.endswith("[= single_transformer_blocks.0.attn.to_q.weight + single_transformer_blocks.0.attn.to_k"
                         ".weight + single_transformer_blocks.0.attn.to_v.weight + single_transformer_blocks.0"
                         ".proj_mlp.weight]"), line
    joined = json.loads((tmp_path / "plan.json").read_text())["joined"]
    assert joined["final_layer.adaLN_modulation.1.weight"] == ["norm_out.linear.weight[32:64]",
                                                              "norm_out.linear.weight[0:32]"]
    assert "img_in.weight" not in joined            # renamed only, not joined


def test_odd_shapes_are_refused_or_joined_never_crash(flux, tmp_path):
    """Hostile or odd diffusers FLUX files: parts of different widths or dtypes are refused by
    name; empty (zero-row) tensors join like any other."""
    folder, _ = flux
    base = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    cases = {
        "width": {"transformer_blocks.0.attn.to_k.weight": torch.zeros(32, 8, dtype=torch.bfloat16)},
        "dtype": {"transformer_blocks.0.attn.to_k.weight": torch.zeros(32, 32, dtype=torch.float16)},
        "odd-halves": {"norm_out.linear.weight": torch.zeros(63, 32, dtype=torch.bfloat16),
                       "norm_out.linear.bias": torch.zeros(63, dtype=torch.bfloat16)},
        "empty": {"transformer_blocks.0.attn.to_k.weight": torch.zeros(0, 32, dtype=torch.bfloat16),
                  "transformer_blocks.0.attn.to_k.bias": torch.zeros(0, dtype=torch.bfloat16)},
    }
    for case, changes in cases.items():
        src = tmp_path / f"{case}.safetensors"
        save_file({**base, **changes}, str(src))
        result = run("convert", src, tmp_path / f"{case}-out.safetensors", "--format", "comfy")
        if case == "empty":
            assert result.exit_code == 0, result.output
            assert load_file(str(tmp_path / "empty-out.safetensors"))["double_blocks.0.img_attn.qkv.weight"].shape[0] == 64
        else:
            assert result.exit_code == 2 and "Traceback" not in result.output, (case, result.output)
            assert next(iter(changes)) in result.output or "halves" in result.output, (case, result.output)


def test_default_recipe_keeps_attention_and_runs_through_comfyuis_loader(flux, tmp_path):
    """Issue 11's bar: the tiny FLUX with defaults, read by ComfyUI's mixed-precision ops (comfy-kitchen's
    QuantizedTensor), renamed back by diffusers' converter: attention BF16, feed-forward FP8, the model's
    output within cosine 0.99 of the original."""
    from test_format_comfy import QuantizedTensor, comfy_mixed_ops_load
    folder, _ = flux
    out = tmp_path / "flux-mixed.safetensors"
    result = run("convert", folder, out, "--format", "comfy")
    assert result.exit_code == 0 and "recipe mixed" in result.output, result.output
    stored = load_file(str(out))
    weights, configs, _, rest = comfy_mixed_ops_load(stored, torch.float32)
    attention = [k[: -len(".weight")] for k in stored if k.endswith(".weight") and "_attn." in k]
    assert attention and not set(attention) & set(configs)
    assert all(stored[layer + ".weight"].dtype == torch.bfloat16 for layer in attention)
    assert {"double_blocks.0.img_mlp.0", "double_blocks.0.txt_mlp.2", "double_blocks.0.img_mod.lin"} <= set(configs)

    state = {k: (w.dequantize() if isinstance(w, QuantizedTensor) else w).float() for k, w in weights.items()}
    state.update({k: v.float() for k, v in rest.items()})
    quantized = tiny_models.build("flux")
    quantized.load_state_dict(BACK["flux"](state), strict=True)
    source = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    reference = tiny_models.build("flux")
    reference.load_state_dict({k: v.float() for k, v in source.items()}, strict=True)
    y_ref, y_q = tiny_models.forward("flux", reference), tiny_models.forward("flux", quantized)
    cos = float(torch.nn.functional.cosine_similarity(y_ref.flatten().double(), y_q.flatten().double(), dim=0))
    assert cos >= 0.99, cos


@pytest.mark.parametrize("recipe", ["mixed", "compact"])
def test_flux_decisions_are_the_same_under_both_namings(flux, recipe):
    """One model, one set of decisions: FLUX's single-block q/k/v are joined with proj_mlp into BFL's
    linear1, so they are quantized in every recipe under diffusers' names too."""
    from quantkit.options import ConvertOptions
    from quantkit.plan import make_plan
    folder, _ = flux
    with open_source(folder) as own:
        native = {t.name for t in make_plan(own, ConvertOptions.from_strings(recipe=recipe)).quantized()}
    with open_source(folder, names="comfyui") as view:
        plan = make_plan(view, ConvertOptions.from_strings(format="comfy", recipe=recipe))
        comfy = {part[0] for t in plan.quantized() for part in view.parts[t.name]}
    assert native == comfy
    attention = {n for n in native if ".attn.to_" in n or ".attn.add_" in n}
    if recipe == "mixed":
        assert attention and all(n.startswith("single_transformer_blocks.") for n in attention)
