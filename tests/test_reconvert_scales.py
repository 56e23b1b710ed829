"""A conversion of a conversion: an FP8 file quantkit wrote (native, comfy, comfy-legacy,
compressed-tensors W8A8 static made with ``convert --stats``) converted into each format again keeps
its static input scales in the target's own convention, bit for bit, and the W8A8 row of
``validate --model-output`` is the first conversion's; the chain validates against the original.

The model: a tiny transformers Llama folder, calibrated by ``quantkit calibrate`` on a user hook's
token batches (every quantized Linear sees token rows, so every layer gets an input scale)."""
import json
import math
import os
import shutil

import pytest
from safetensors import safe_open
from tiny_models import build

from quantkit.formats import detect_format
from quantkit.readback import input_scale, open_output
from runs import run

FORMATS = ("native", "comfy", "comfy-legacy", "compressed-tensors")
FOLDER = {"compressed-tensors"}
LLAMA_CONFIG = []     # the calibrated model's config.json (set by the fixture)
METRICS = ("sqnr", "psnr", "cosine", "max_abs_error", "rel_l2")
HOOK = '''import torch

def batches():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 1000, (1, 12), generator=g)} for _ in range(4)]
'''


def out_path(root, name, fmt):
    """Where a conversion into ``fmt`` goes: a folder for compressed-tensors; a file in a folder of its
    own with the model's config.json beside it otherwise (compressed-tensors needs one beside its source)."""
    if fmt in FOLDER:
        return root / name
    (root / name).mkdir(exist_ok=True)
    shutil.copy(LLAMA_CONFIG[0], root / name / "config.json")
    return root / name / "model.safetensors"


def convert(src, dst, fmt, *extra):
    result = run("convert", src, dst, "--format", fmt, "--overwrite", *extra)
    assert result.exit_code == 0, result.output
    return result.output


def input_scales(path) -> dict:
    """Layer weight -> its static input scale, as the file's format stores it (read back)."""
    with open_output(str(path)) as f:
        stored = detect_format(f).stored(f)
        return {name: input_scale(f, s) for name, s in stored.items() if s.input_scale_key is not None}


def file_row(output, original) -> dict:
    """The W8A8 'file' row of ``validate OUT --against ORIGINAL --model-output --activations file``
    (which also checks the whole chain: hashes and every tensor against the original)."""
    report = f"{output}.validate.json"
    result = run("validate", output, "--against", original, "--model-output", "--activations", "file",
                 "--json", report, "--overwrite")
    assert result.exit_code == 0, result.output
    with open(report) as f:
        rows = json.load(f)["model_output"]["rows"]
    return next(r for r in rows if r["row"] == "file")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("reconvert")
    llama = root / "llama"
    build("llama").save_pretrained(llama)
    LLAMA_CONFIG[:] = [llama / "config.json"]
    (root / "hook.py").write_text(HOOK)
    stats = root / "llama.stats"
    result = run("calibrate", llama, "-o", stats, "--recipe", "compact", "--inputs", f"{root / 'hook.py'}:batches",
                 "-q")
    assert result.exit_code == 0, result.output
    firsts = {}
    for fmt in FORMATS:
        firsts[fmt] = out_path(root, f"first-{fmt}", fmt)
        convert(llama, firsts[fmt], fmt, "--recipe", "compact", "--stats", stats)
    rows = {fmt: file_row(path, llama) for fmt, path in firsts.items()}
    return root, firsts, rows


def test_first_conversions_hold_the_same_power_of_two_scales(calibrated):
    _, firsts, rows = calibrated
    scales = {fmt: input_scales(path) for fmt, path in firsts.items()}
    reference = scales["native"]
    assert reference and all(math.frexp(v)[0] == 0.5 for v in reference.values())    # powers of two
    for fmt, got in scales.items():
        assert got == reference, fmt
    for fmt, row in rows.items():
        assert row["inputs"] is None or row["inputs"].get("static") == len(reference), (fmt, row)


@pytest.mark.parametrize("target", FORMATS)
@pytest.mark.parametrize("source", FORMATS)
def test_reconversion_keeps_every_input_scale(calibrated, source, target):
    root, firsts, rows = calibrated
    dst = out_path(root, f"{source}-to-{target}", target)
    output = convert(firsts[source], dst, target)
    assert input_scales(dst) == input_scales(firsts["native"])
    # The same W8A8 model (the source's codes, weight and input scales): its 'file' row equals the first
    # conversion's, whichever client runs it (transformers for compressed-tensors, else the runtime),
    # and the chain validates against the original.
    row, want = file_row(dst, root / "llama"), rows[source]
    assert {k: row[k] for k in METRICS} == {k: want[k] for k in METRICS}, (row, want)
    assert not [line for line in output.splitlines() if line.startswith("warning") and "input scale" in line], output
    n = len(input_scales(firsts["native"]))
    assert f"with {n} of its {n} static input scales" in output


# ----------------------------------------------------------------------------- validate a chain against its original

@pytest.fixture(scope="module")
def flux_chain(tmp_path_factory):
    """A diffusers FLUX folder -> comfy (BFL names, q/k/v joined) -> native -> comfy-legacy, and another
    FLUX (other weights, same names) as a wrong original."""
    root = tmp_path_factory.mktemp("chain")
    build("flux").save_pretrained(root / "flux")
    build("flux", seed=1).save_pretrained(root / "other")
    chain = [root / "flux"]
    for fmt in ("comfy", "native", "comfy-legacy"):
        chain.append(root / f"{len(chain)}-{fmt}.safetensors")
        convert(chain[-2], chain[-1], fmt)
    return root, chain


@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_conversion_of_a_conversion_validates_against_the_original(flux_chain, step):
    root, chain = flux_chain
    result = run("validate", chain[step], "--against", root / "flux")
    assert result.exit_code == 0, result.output
    if step > 1:
        assert "made from an FP8 conversion" in result.output and "of flux" in result.output
        assert "sha256 original: OK" in result.output
    assert "missing" not in result.output
    # its own source, the FP8 file it was converted from, validates it too
    assert run("validate", chain[step], "--against", chain[step - 1]).exit_code == 0


@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_chain_fails_against_a_wrong_original(flux_chain, step):
    root, chain = flux_chain
    result = run("validate", chain[step], "--against", root / "other")
    assert result.exit_code == 1 and "sha256 mismatch" in result.output, result.output


def test_a_chain_runs_the_model_output_against_the_original(flux_chain):
    root, chain = flux_chain
    result = run("validate", chain[3], "--against", root / "flux", "--model-output", "--activations", "none")
    assert result.exit_code == 0 and "model output" in result.output, result.output


def test_a_file_inside_a_folder_output_chains_to_the_original(calibrated, tmp_path):
    root, firsts, _ = calibrated
    dst = out_path(tmp_path, "from-ct-file", "native")
    convert(firsts["compressed-tensors"] / "model.safetensors", dst, "native")
    result = run("validate", dst, "--against", root / "llama")
    assert result.exit_code == 0 and "sha256 original: OK" in result.output, result.output
