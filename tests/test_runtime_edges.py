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
