"""Edges a new user meets after converting: ``quantkit sensitivity --format comfy`` on a diffusers
FLUX (planned under ComfyUI's names, as convert writes it), and a model loaded by
``quantkit.runtime`` moved with ``.to(dtype)`` / ``.half()`` / ``.float()`` / ``.to("cpu")``."""
import json

import pytest
import torch
from tiny_models import build, example_inputs, forward

import quantkit.runtime as qr
from runs import run


# ----------------------------------------------------------------------------- sensitivity --format comfy

@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("sens")
    build("flux").save_pretrained(root / "flux")
    return root


def test_sensitivity_comfy_on_a_diffusers_flux_ranks_comfyuis_layers(flux):
    report = flux / "sens.json"
    result = run("sensitivity", flux / "flux", "--format", "comfy", "--recipe", "compact", "--target-sqnr", 60,
                 "--json", report, "-q")
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    names = {layer["name"] for layer in doc["layers"]}
    # BFL's names, as convert --format comfy writes them: q/k/v joined under one scale
    assert "double_blocks.0.img_attn.qkv.weight" in names and "single_blocks.0.linear1.weight" in names
    assert not any(n.startswith("transformer_blocks.") for n in names)
    # The whole plan measured here is the output convert --format comfy writes (kept layers in fp32,
    # as sensitivity holds them), run by validate --model-output: the same SQNR.
    out = flux / "flux-comfy.safetensors"
    assert run("convert", flux / "flux", out, "--format", "comfy", "--recipe", "compact", "--keep-dtype", "fp32",
               "-q").exit_code == 0
    check = flux / "validate.json"
    assert run("validate", out, "--against", flux / "flux", "--model-output", "--activations", "none",
               "--json", check, "-q").exit_code == 0
    assert doc["all_sqnr"] == pytest.approx(json.loads(check.read_text())["model_output"]["sqnr"], abs=0.01)
    # the keep list it proposes is one convert --format comfy takes
    keep = [arg for name in doc["keep"] for arg in ("--keep", name)]
    assert doc["keep"] and run("convert", flux / "flux", flux / "kept.safetensors", "--format", "comfy",
                               "--recipe", "compact", *keep, "-q").exit_code == 0


def test_sensitivity_native_keeps_the_diffusers_names(flux):
    report = flux / "native.json"
    assert run("sensitivity", flux / "flux", "--json", report, "-q").exit_code == 0
    names = {layer["name"] for layer in json.loads(report.read_text())["layers"]}
    assert names and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.", "norm_out",
                                       "proj_out", "time_text", "context", "x_embedder")) for n in names), names


# ----------------------------------------------------------------------------- a loaded model moved with .to()

@pytest.fixture(scope="module")
def flux_fp8(flux):
    """The tiny FLUX in ComfyUI's layout (q/k/v joined, BF16 kept weights) and with static input scales
    in native, both read back onto the diffusers model."""
    out = flux / "flux-fp8.safetensors"
    assert run("convert", flux / "flux", out, "--format", "comfy", "--recipe", "compact", "-q").exit_code == 0
    return out


def loaded(path, mode, compute_dtype=None, **kw):
    with qr.empty_weights():
        model = type(build("flux")).from_config(build("flux").config).eval()
    return qr.load(model, path, mode=mode, compute_dtype=compute_dtype, **kw)


def run_flux(model, dtype):
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in example_inputs("flux").items()}
    return forward("flux", model, inputs)


def fp8_buffers(model) -> set:
    return {b.dtype for n, b in model.named_buffers() if n.endswith("weight_fp8") and not b.is_meta}


MOVES = {  # what is called on the float32 model -> the compute dtype it then has
    "to(bfloat16)": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "half()": (lambda m: m.half(), torch.float16),
    "to(bfloat16).float()": (lambda m: m.to(torch.bfloat16).float(), torch.float32),
    "to('cpu')": (lambda m: m.to("cpu"), torch.float32),
    "to('cpu', torch.float16)": (lambda m: m.to("cpu", torch.float16), torch.float16),
}


@pytest.mark.parametrize("mode", ["resident", "streamed"])
@pytest.mark.parametrize("move", list(MOVES))
def test_to_dtype_keeps_fp8_and_computes_in_the_new_dtype(flux_fp8, mode, move):
    """After the move the model computes what one loaded in that compute dtype computes, bit for bit,
    and its codes are still the file's FP8 (held at the FP8 file's size)."""
    how, dtype = MOVES[move]
    model = loaded(flux_fp8, mode)
    before = qr.tensor_bytes(model)
    assert how(model) is model
    assert model.quantkit_runtime.compute_dtype == dtype and model.dtype == dtype
    got = run_flux(model, dtype)
    want = run_flux(loaded(flux_fp8, mode, dtype), dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    if mode == "resident":
        assert fp8_buffers(model) == {torch.float8_e4m3fn}
        assert qr.tensor_bytes(model) <= before * (1 if dtype.itemsize < 4 else 1.01)


def test_to_an_unsupported_dtype_is_refused_and_changes_nothing(flux_fp8):
    model = loaded(flux_fp8, "resident")
    reference = run_flux(model, torch.float32)
    with pytest.raises(ValueError, match="16 bits or more"):
        model.to(torch.float8_e4m3fn)
    with pytest.raises(TypeError):          # torch's own refusal: not a floating-point dtype
        model.to(torch.int8)
    assert model.quantkit_runtime.compute_dtype == torch.float32
    assert torch.equal(run_flux(model, torch.float32), reference)


def test_a_streamed_model_stays_on_the_cpu(flux_fp8):
    model = loaded(flux_fp8, "streamed")
    with pytest.raises(ValueError, match="mode='resident'"):
        model.to("meta")
    assert run_flux(model, torch.float32).isfinite().all()


def test_static_input_scales_survive_a_dtype_change(flux_fp8, flux, tmp_path):
    """W8A8 as the file implies (activations='file'): the input quantization follows the move."""
    stats = tmp_path / "flux.stats"
    assert run("calibrate", flux / "flux", "-o", stats, "--recipe", "compact", "--steps", "1", "--seeds", "1",
               "-q").exit_code == 0
    out = tmp_path / "flux-w8a8.safetensors"
    assert run("convert", flux / "flux", out, "--recipe", "compact", "--stats", stats, "-q").exit_code == 0
    model = loaded(out, "resident", activations="file").to(torch.bfloat16)
    assert model.quantkit_runtime.inputs.get("static")
    assert torch.equal(run_flux(model, torch.bfloat16),
                       run_flux(loaded(out, "resident", torch.bfloat16, activations="file"), torch.bfloat16))


def test_a_copy_moves_alone(flux_fp8):
    import copy
    model = loaded(flux_fp8, "resident")
    moved = copy.deepcopy(model).to(torch.bfloat16)
    assert model.quantkit_runtime.compute_dtype == model.dtype == torch.float32
    assert moved.quantkit_runtime.compute_dtype == moved.dtype == torch.bfloat16
    assert torch.equal(run_flux(moved, torch.bfloat16), run_flux(loaded(flux_fp8, "resident", torch.bfloat16),
                                                                  torch.bfloat16))
    assert run_flux(model, torch.float32).dtype == torch.float32
