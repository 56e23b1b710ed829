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
import torch
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


# ----------------------------------------------------------------------------- conventions and what cannot be held

def small_model(tmp_path, activations, fp8="float8_e4m3fn"):
    """Three linears (test_convert_stats' model) and a stats file giving ``activations`` (weight -> range)."""
    from safetensors.torch import save_file
    from test_convert_stats import linears, make_stats
    src = tmp_path / "model.safetensors"
    save_file(linears(), str(src))
    stats = make_stats(src, fp8=fp8, activations={k: torch.tensor(v) for k, v in activations.items()},
                       path=tmp_path / "model.stats")
    return src, stats.path


def raw_scales(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).item() for k in f.keys() if k.endswith((".input_scale", ".scale_input"))}


def test_a_comfy_e5m2_input_scale_moves_to_e4m3_and_back(tmp_path):
    """ComfyUI quantizes an E5M2 layer's input in E5M2 (scale = range / 57344); native's inputs are E4M3
    (range / 448): the carried scale is 128x larger there, exactly, and comes back unchanged."""
    layers = [f"blocks.{i}.fc.weight" for i in range(3)]
    src, stats = small_model(tmp_path, {name: 1000.0 * (i + 1) for i, name in enumerate(layers)}, "float8_e5m2")
    comfy, native, again = tmp_path / "c.safetensors", tmp_path / "n.safetensors", tmp_path / "c2.safetensors"
    convert(src, comfy, "comfy", "--preset", "generic", "--stats", stats)
    convert(comfy, native, "native")
    convert(native, again, "comfy")
    c, n, c2 = raw_scales(comfy), raw_scales(native), raw_scales(again)
    assert len(c) == 3 and c == c2
    assert n == {k: v * 128 for k, v in c.items()}
    assert input_scales(comfy) == input_scales(again)


def test_comfy_legacy_names_the_layers_it_cannot_keep_weight_only(tmp_path):
    """A native file with static scales on some layers only: comfy-legacy cannot mark the others
    weight-only (ComfyUI would quantize their inputs with 1.0), and says so naming them; comfy can."""
    src, stats = small_model(tmp_path, {"blocks.0.fc.weight": 6.0})
    native = tmp_path / "n.safetensors"
    convert(src, native, "native", "--preset", "generic", "--stats", stats)
    output = convert(native, tmp_path / "l.safetensors", "comfy-legacy")
    warning = [line for line in output.splitlines() if "cannot mark a layer weight-only" in line]
    assert len(warning) == 1 and "blocks.1.fc.weight" in warning[0] and "blocks.2.fc.weight" in warning[0]
    assert "blocks.0.fc.weight" not in warning[0]
    assert "with 1 of its 1 static input scales" in output
    output = convert(native, tmp_path / "c.safetensors", "comfy")
    assert "weight-only" not in output


def test_the_note_says_when_a_source_has_no_input_scales(tmp_path):
    src, _ = small_model(tmp_path, {})
    native = tmp_path / "n.safetensors"
    convert(src, native, "native", "--preset", "generic")
    output = convert(native, tmp_path / "c.safetensors", "comfy")
    assert "FP8 codes and weight scales are carried over (it holds no static input scales)" in output


def test_a_format_without_a_place_warns_naming_the_dropped_scales(tmp_path):
    """The guard every format inherits: an input scale of the source that the layout leaves out is named."""
    from quantkit.formats import get_format
    from quantkit.plan import ConvertOptions, make_plan
    from quantkit.sources import open_source
    src, stats = small_model(tmp_path, {f"blocks.{i}.fc.weight": 6.0 for i in range(3)})
    native = tmp_path / "n.safetensors"
    convert(src, native, "native", "--preset", "generic", "--stats", stats)
    with open_source(str(native)) as source:
        plan = make_plan(source, ConvertOptions.from_strings(format="native"))
    fmt = get_format("native")
    assert fmt.warnings(plan) == []
    plan.outputs = [e for e in plan.outputs if not e.spec.key.endswith(".input_scale")]
    warning, = fmt.warnings(plan)
    assert "3 static input scale(s)" in warning and "blocks.0.fc.weight" in warning
