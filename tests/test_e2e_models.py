"""End to end on real architectures built from diffusers / transformers configs: convert through
the CLI, validate, check the policy's decisions on real key names, and compare the dequantized
model's output with the original's."""
import json

import pytest
import torch
from safetensors import safe_open

from quantkit.readback import load_dequantized
from runs import run

from tiny_models import build, forward, save_state_dict, without_zero_layers

GOLDEN = __import__("pathlib").Path(__file__).parent / "golden"

# (model, granularity). Measured relative L2 error of the model's output, FP8 vs BF16:
# 0.003 (llama) to 0.032 (t5); the bar is 0.05. Dimensions are < 128, so "block" exercises
# the edge tiles.
CASES = [("flux", "tensor"), ("flux", "channel"), ("flux", "block"), ("sd3", "tensor"), ("qwen_image", "tensor"),
         ("flux_controlnet", "tensor"), ("unet_sdxl", "channel"), ("t5_encoder", "tensor"), ("clip_text", "block"),
         ("llama", "channel")]
MAX_REL_ERROR = 0.05



@pytest.mark.parametrize("name,granularity", CASES)
def test_convert_validate_and_model_output(tmp_path, name, granularity):
    model = without_zero_layers(build(name))
    src, out = tmp_path / f"{name}.safetensors", tmp_path / f"{name}-fp8.safetensors"
    original = save_state_dict(model, src)                   # a BF16 checkpoint with real key names

    # The generic policy: its decisions are the golden lists of tests/test_policy.py (presets have their own).
    result = run("convert", src, out, "--granularity", granularity, "--preset", "generic")
    assert result.exit_code == 0, result.output
    report = tmp_path / "report.json"
    result = run("validate", out, "--against", src, "--min-sqnr", 28, "--json", report)
    assert result.exit_code == 0, result.output

    # The policy's decisions on the real key names are the golden ones.
    with safe_open(str(out), "pt") as f:
        quantized = {k for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"}
        assert set(json.loads(f.metadata()["quantkit.quantized"])) == {k[: -len(".weight")] for k in quantized}
    golden = set((GOLDEN / f"policy_{name}.txt").read_text().split())
    assert quantized == golden

    # The model's output: original BF16 weights vs. the dequantized FP8 checkpoint.
    reference = forward(name, _loaded(model, {k: v.float() if v.is_floating_point() else v for k, v in original.items()}))
    restored = forward(name, _loaded(build(name), load_dequantized(str(out))))
    rel = float((reference - restored).double().norm() / reference.double().norm())
    cos = float(torch.nn.functional.cosine_similarity(reference.flatten().double(), restored.flatten().double(), dim=0))
    assert reference.abs().max() > 0 and rel <= MAX_REL_ERROR and cos >= 0.999, (rel, cos)


def _loaded(model, state):
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


def test_flux_plan_shows_the_adaln_linears_as_linears(tmp_path):
    src = tmp_path / "flux.safetensors"
    save_state_dict(build("flux"), src)
    plan = tmp_path / "plan.json"
    assert run("plan", src, "--json", plan, "--preset", "generic").exit_code == 0
    decisions = {t["name"]: t for t in json.loads(plan.read_text())["tensors"]}
    assert decisions["transformer_blocks.0.norm1.linear.weight"]["action"] == "quantize"
    assert decisions["transformer_blocks.0.ff.net.0.proj.weight"]["action"] == "quantize"
    assert decisions["transformer_blocks.0.attn.to_q.weight"]["action"] == "keep"
    assert decisions["transformer_blocks.0.norm1.linear.bias"]["action"] == "keep"
    assert decisions["x_embedder.weight"]["action"] == "keep"
