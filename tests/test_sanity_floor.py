"""validate's default sanity floor, and the convert-time warnings of stats that do not fit the weights.

An FP8 tensor whose SQNR falls more than 3 dB below the least that round-to-nearest with its own
scale groups' absmax can give (``metrics.rtn_sqnr_bound``) fails validation (exit 1, naming the
tensor) unless the user sets the bar with --min-sqnr; publish then publishes nothing. The bound is
checked here against real round-to-nearest on data built to sit at its worst (every value at the
largest relative rounding error, outlier-heavy tensors, subnormal-heavy groups): a correct conversion
never fails it. The outputs that must fail are the issue's: stats that clip (a percentile given as a
fraction: most values clipped, 0.06 dB), a fine-tune with 3x larger weights converted with the base
model's stats (--force-stats), and a hand-edited range of 3e38 (every code 0).
"""
import json
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from quantkit import fp8
from quantkit.calibration.stats import Stats, fingerprint, load, save
from quantkit.dtypes import E4M3FN, E5M2, Granularity
from quantkit.hashing import combined_digest, sha256_file
from quantkit.metrics import ErrorStats, ScaleFit, peak_to_rms_db, rtn_sqnr_bound
from runs import run

RULES = ("--preset", "generic", "--quantize", "*")
LAYERS = ("blocks.0.fc.weight", "blocks.1.fc.weight", "blocks.2.fc.weight")


def weights(seed=0, scale=1.0, outliers=True) -> dict:
    """Three bf16 linears shaped like real ones: Gaussian, with a few outliers (peak/RMS ~ 25-35 dB)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, name in enumerate(LAYERS):
        w = torch.randn(256, 128, generator=g) * 0.05
        if outliers:
            w.view(-1)[torch.randint(0, w.numel(), (8,), generator=g)] *= 8.0
        sd[name] = (w * scale).bfloat16()
        sd[name.replace("weight", "bias")] = (torch.randn(256, generator=g) * 0.01).bfloat16()
    return sd


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("floor")


@pytest.fixture(scope="module")
def src(work):
    path = work / "model.safetensors"
    save_file(weights(), str(path))
    return path


def stats_of(src, path, factor=None, granularity="tensor", for_source=None, fixed=None) -> str:
    """A stats file of ``for_source`` (default ``src``) whose weight ranges are ``src``'s absmax times
    ``factor[name]`` (a clipping or a too-wide range where the factor is not 1), or ``fixed[name]``."""
    for_source = for_source or src
    sd = load_file(str(src))
    ranges = {n: fp8.absmax(sd[n].float(), Granularity(granularity)) * (factor or {}).get(n, 1.0) for n in LAYERS}
    ranges.update({n: torch.tensor(float(v)) for n, v in (fixed or {}).items()})
    from quantkit.checkpoint import open_checkpoint
    with open_checkpoint(str(for_source)) as f:
        fp, files = fingerprint(f.tensors), list(f.files)
    stats = Stats(source={"name": os.path.basename(str(for_source)), "fingerprint": fp,
                          "sha256": combined_digest({p: sha256_file(p) for p in files})},
                  granularity=granularity, fp8="float8_e4m3fn", weight_observer="absmax", weights=ranges)
    save(stats, str(path), overwrite=True)
    return str(path)


def validate_json(out, src, tmp_path, *extra):
    report = tmp_path / f"v{len(list(tmp_path.iterdir()))}.json"
    result = run("validate", out, "--against", src, "-q", "--json", report, *extra)
    return result, json.loads(report.read_text())


# ----------------------------------------------------------------------------- the bound itself

def rtn_sqnr(x: torch.Tensor, g: Granularity, fmt) -> tuple[float, float]:
    """(SQNR of round-to-nearest with absmax scales, its peak-to-RMS in dB): what a correct convert writes."""
    scale = fp8.scale_from_absmax(fp8.absmax(x, g), fmt)
    y = fp8.dequantize(fp8.quantize(x, scale, g, fmt), scale, g)
    s = ErrorStats().update(x, y)
    return s.sqnr, peak_to_rms_db(s.n, s.sum_x2, s.peak)


@settings(max_examples=60)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 300), cols=st.integers(1, 300),
       spread=st.floats(0.0, 12.0), g=st.sampled_from(list(Granularity)), fmt=st.sampled_from([E4M3FN, E5M2]))
def test_round_to_nearest_never_falls_below_the_bound(seed, rows, cols, spread, g, fmt):
    """Log-uniform magnitudes over ``spread`` decades (up to 12: most of a group in subnormals): the
    bound holds for every granularity and both encodings."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.sign(torch.randn(rows, cols, generator=gen)) * 10 ** (-spread * torch.rand(rows, cols, generator=gen))
    sqnr, crest = rtn_sqnr(x, g, fmt)
    assert sqnr >= rtn_sqnr_bound(crest, fmt) - 1e-6


def test_the_bound_is_tight_where_every_value_rounds_at_its_worst():
    """Every value halfway between two E4M3 codes at the bottom of a binade (1 + 1/16: relative error
    2^-4 / (1 + 2^-4)) but the absmax: round-to-nearest lands within a fraction of a dB of the bound."""
    x = torch.full((64, 64), 1.0625)
    x[0, 0] = 448.0 / 256            # the absmax maps to 448: the others to 1.0625 * 256 (ties to even)
    sqnr, crest = rtn_sqnr(x, Granularity.TENSOR, E4M3FN)
    bound = rtn_sqnr_bound(crest, E4M3FN)
    assert bound <= sqnr < bound + 0.6


def test_real_weights_sit_far_above_the_floor(src):
    for name in LAYERS:
        x = load_file(str(src))[name].float()
        for g in Granularity:
            sqnr, crest = rtn_sqnr(x, g, E4M3FN)
            assert sqnr > rtn_sqnr_bound(crest, E4M3FN) + 6 > 29, (name, g)


def test_scale_fit_counts_what_a_scale_clips_and_how_far_it_overshoots():
    x = torch.tensor([[1.0, -4.0, 0.5, 2.0]])
    fit = ScaleFit(E4M3FN)
    fit.update(x, torch.tensor(2.0 / 448), Granularity.TENSOR)
    assert fit.clipped == 1 and fit.clipped_fraction == 0.25 and fit.clip_e2 == 4.0
    assert fit.clip_sqnr == pytest.approx(10 * math.log10(21.25 / 4.0)) and fit.fill == 2.0 and not fit.zeroed
    wide = ScaleFit(E4M3FN)
    wide.update(x, torch.tensor(3e38 / 448), Granularity.TENSOR)
    assert wide.clipped == 0 and wide.clip_sqnr == math.inf and wide.zeroed
    per_row = ScaleFit(E4M3FN)
    per_row.update(torch.tensor([[1.0, 2.0], [3.0, -9.0]]), torch.tensor([[2.0], [3.0]]) / 448, Granularity.CHANNEL)
    assert per_row.clipped == 1 and per_row.clip_e2 == 36.0 and per_row.fill == 1.0


# ----------------------------------------------------------------------------- validate

def test_correct_conversions_pass_and_the_report_shows_the_floor(src, tmp_path):
    for extra in ((), ("--granularity", "channel"), ("--granularity", "block"), ("--fp8-dtype", "float8_e5m2"),
                  ("--format", "comfy")):
        out = tmp_path / f"out{len(extra) and extra[-1]}.safetensors"
        assert run("convert", src, out, *RULES, *extra, "-q").exit_code == 0
        result, doc = validate_json(out, src, tmp_path)
        assert result.exit_code == 0 and doc["ok"], (extra, result.output)
        assert doc["sqnr_floor"]["rule"] == "default" and doc["sqnr_floor"]["margin_db"] == 3.0
        floors = [t["sqnr_floor"] for t in doc["tensors"] if t["stored"] == "fp8"]
        assert len(floors) == 3 and all(15 < f < 22 for f in floors), floors
        assert all(t["sqnr"] > t["sqnr_floor"] + 9 for t in doc["tensors"] if t["stored"] == "fp8")
        assert "  sanity floor: every FP8 tensor's SQNR within 3 dB" in run("validate", out, "--against", src).output


def test_clipping_stats_fail_validation_naming_the_tensor_unless_the_user_sets_the_bar(src, tmp_path):
    """The issue's false PASS: most values clipped (a percentile given as a fraction)."""
    stats = stats_of(src, tmp_path / "clip.stats", {LAYERS[1]: 0.01})
    out = tmp_path / "out.safetensors"
    convert = run("convert", src, out, *RULES, "--stats", stats, "-q")
    assert convert.exit_code == 0
    for jobs in ("1", "2"):                                    # in this process, and in worker processes
        result, doc = validate_json(out, src, tmp_path, "--jobs", jobs)
        assert result.exit_code == 1 and not doc["ok"]
        assert len(doc["failures"]) == 1 and doc["failures"][0].startswith(f"{LAYERS[1]}: SQNR ")
        assert "below its sanity floor" in doc["failures"][0] and "convert without --stats" in doc["failures"][0]
        assert "--min-sqnr DB sets your own bar" in doc["failures"][0]
    text = run("validate", out, "--against", src).output
    assert "FAIL: 1 problem(s)" in text and f"    {LAYERS[1]}: SQNR" in text
    result, doc = validate_json(out, src, tmp_path, "--min-sqnr", "-5")    # the user's bar replaces the floor
    assert result.exit_code == 0 and doc["ok"] and doc["sqnr_floor"] == {
        "rule": "min-sqnr", "db": -5.0, "what": "every tensor's SQNR >= -5 dB"}


def test_a_zeroed_layer_fails(src, tmp_path):
    stats = stats_of(src, tmp_path / "wide.stats", fixed={LAYERS[0]: 3e38})
    out = tmp_path / "out.safetensors"
    assert run("convert", src, out, *RULES, "--stats", stats, "-q").exit_code == 0
    assert not bool(load_file(str(out))[LAYERS[0]].float().any())            # every code 0
    result, doc = validate_json(out, src, tmp_path)
    assert result.exit_code == 1 and [f.split(":")[0] for f in doc["failures"]] == [LAYERS[0]]
    assert "SQNR 0.00 dB (cosine 0.0000)" in doc["failures"][0]


def test_a_fine_tune_3x_larger_converted_with_the_base_models_stats_fails(work, tmp_path):
    base, tuned = work / "base.safetensors", work / "tuned.safetensors"
    save_file(weights(outliers=False), str(base))
    save_file(weights(scale=3.0, outliers=False), str(tuned))
    stats = stats_of(base, tmp_path / "base.stats")                          # the base model's ranges
    out = tmp_path / "tuned-fp8.safetensors"
    convert = run("convert", tuned, out, *RULES, "--stats", stats, "--force-stats", "-q")
    assert convert.exit_code == 0
    assert "3 tensor(s) clipped by the stats' weight ranges" in convert.output
    result, doc = validate_json(out, tuned, tmp_path)
    assert result.exit_code == 1 and sorted(f.split(":")[0] for f in doc["failures"]) == sorted(LAYERS)
    assert all(10 < t["sqnr"] < 20 for t in doc["tensors"] if t["stored"] == "fp8")


# ----------------------------------------------------------------------------- publish

def test_publish_never_calls_a_clipped_output_passed(src, tmp_path):
    stats = stats_of(src, tmp_path / "clip.stats", {LAYERS[2]: 0.05})
    out = tmp_path / "out.safetensors"
    assert run("convert", src, out, *RULES, "--stats", stats, "-q").exit_code == 0
    r = run("publish", out, tmp_path / "release", "--against", src)
    assert r.exit_code == 1 and "validation failed" in r.output and LAYERS[2] in r.output
    assert not (tmp_path / "release").exists()
    # A report that passed without the floor (quantkit before it, or edited) is refused too.
    report = tmp_path / "old.json"
    validate_json(out, src, tmp_path)
    run("validate", out, "--against", src, "-q", "--json", report)
    doc = json.loads(report.read_text())
    doc.update(ok=True, failures=[])
    doc.pop("sqnr_floor")
    for t in doc["tensors"]:
        t.pop("sqnr_floor")
    report.write_text(json.dumps(doc))
    r = run("publish", out, tmp_path / "release", "--report", report)
    assert r.exit_code == 1 and "below the sanity floor" in r.output and LAYERS[2] in r.output
    assert not (tmp_path / "release").exists()
    doc["min_sqnr"] = 0.0                      # the user's own bar (a report made with --min-sqnr 0)
    report.write_text(json.dumps(doc))
    assert run("publish", out, tmp_path / "release", "--report", report).exit_code == 0


def test_the_card_of_a_correct_output_names_the_floor(src, tmp_path):
    out = tmp_path / "out.safetensors"
    assert run("convert", src, out, *RULES, "-q").exit_code == 0
    r = run("publish", out, tmp_path / "release", "--against", src)
    assert r.exit_code == 0, r.output
    card = (tmp_path / "release" / "README.md").read_text()
    assert (": passed (sanity floor: every FP8 tensor's SQNR within 3 dB of the least that round-to-nearest "
            "with its own absmax scale gives its data).") in card


# ----------------------------------------------------------------------------- convert's warnings

def test_convert_warns_of_clipping_and_of_ranges_far_above_the_weights(src, tmp_path):
    stats = stats_of(src, tmp_path / "clip.stats", {LAYERS[0]: 0.01, LAYERS[1]: 0.1})
    r = run("convert", src, tmp_path / "a.safetensors", *RULES, "--stats", stats, "-q", "--json", tmp_path / "a.json")
    assert r.exit_code == 0
    lines = [x for x in r.output.splitlines() if "clipped by the stats" in x]
    assert len(lines) == 1 and f"2 tensor(s) clipped by the stats' weight ranges, worst {LAYERS[0]}: " in lines[0]
    assert "recalibrate this checkpoint" in lines[0] and "or convert without --stats" in lines[0]
    pct = float(lines[0].split(f"worst {LAYERS[0]}: ")[1].split("%")[0])
    assert 90 < pct < 100                                                      # most values at the FP8 maximum
    assert lines[0] in [f"warning: {w}" for w in json.loads((tmp_path / "a.json").read_text())["warnings"]]
    stats = stats_of(src, tmp_path / "wide.stats", fixed={LAYERS[2]: 1e38})
    r = run("convert", src, tmp_path / "b.safetensors", *RULES, "--stats", stats, "-q")
    assert r.exit_code == 0
    assert f"1 tensor(s) with weight ranges far above their weights, worst {LAYERS[2]}: " in r.output
    assert "every value rounds to 0" in r.output


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_stats_that_fit_warn_of_nothing(src, tmp_path, granularity):
    """Absmax ranges, ranges a little below (an MSE observer's), or 2x above (a lighter fine-tune)."""
    for factor in (1.0, 0.9, 2.0):
        stats = stats_of(src, tmp_path / "s.stats", {n: factor for n in LAYERS}, granularity)
        r = run("convert", src, tmp_path / "o.safetensors", *RULES, "--stats", stats, "-q", "--overwrite")
        assert r.exit_code == 0 and "warning" not in r.output, (factor, r.output)


def test_convert_with_jobs_warns_from_its_worker_processes(src, tmp_path):
    stats = stats_of(src, tmp_path / "clip.stats", {LAYERS[1]: 0.01})
    r = run("convert", src, tmp_path / "out", *RULES, "--stats", stats, "-q", "--max-shard-size", "40KB",
            "--jobs", "2")
    assert r.exit_code == 0 and f"1 tensor(s) clipped by the stats' weight ranges, worst {LAYERS[1]}" in r.output


# ----------------------------------------------------------------------------- calibrate --observer percentile:Q

@pytest.mark.parametrize("option", ["--observer", "--activation-observer"])
def test_a_percentile_given_as_a_fraction_is_refused(src, tmp_path, option):
    r = run("calibrate", src, "-o", tmp_path / "s", option, "percentile:0.9999")
    assert r.exit_code == 2 and "percentile takes a percent, e.g. percentile:99.99" in r.output
    assert "write percentile:99.99" in r.output and not (tmp_path / "s").exists()
    for q in ("nan", "0", "-1", "101", "1", "inf"):
        r = run("calibrate", src, "-o", tmp_path / "s", option, f"percentile:{q}")
        assert r.exit_code == 2 and "percentile takes a percent" in r.output, (q, r.output)
    assert run("calibrate", src, "-o", tmp_path / "s", "--observer", "percentile:99.9", "-q").exit_code == 0


def test_calibrate_names_the_weights_its_clipping_statistic_puts_below_validates_floor(src, tmp_path):
    """A weight statistic under the absmax clips: calibrate measures each weight's SQNR with it and
    names, in one note, those below validate's default floor; the file converted with those stats
    fails validate on exactly as many. absmax (the default) and mse never clip below it."""
    r = run("calibrate", src, "-o", tmp_path / "p.stats", *RULES, "--observer", "percentile:99")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "clipped by the percentile" in x)
    count = int(line.split("note: ")[1].split(" weight(s)")[0])
    assert count >= 1 and "below validate's default floor" in line and "use --observer absmax" in line
    out = tmp_path / "p.safetensors"
    assert run("convert", src, out, *RULES, "--stats", tmp_path / "p.stats", "-q").exit_code == 0
    v = run("validate", out, "--against", src)
    assert v.exit_code == 1 and f"FAIL: {count} problem(s)" in v.output, v.output
    for observer in ("absmax", "mse"):
        r = run("calibrate", src, "-o", tmp_path / f"{observer}.stats", *RULES, "--observer", observer)
        assert r.exit_code == 0 and "clipped by the" not in r.output, r.output


# ----------------------------------------------------------------------------- layers without an input range

def test_per_sample_layers_are_a_note_and_unreached_ones_a_warning(src, tmp_path):
    path = stats_of(src, tmp_path / "s.stats")
    stats = load(path)
    stats.activations = {LAYERS[0]: torch.tensor(3.0)}
    stats.activation_observer, stats.samples = "absmax", 4
    stats.layers = {LAYERS[1]: {"input_per_sample": True, "input_absmax": 2.0}}
    save(stats, path, overwrite=True)
    r = run("convert", src, tmp_path / "o.safetensors", *RULES, "--stats", path, "-q")
    assert r.exit_code == 0
    assert f"1 per-sample modulation layer(s) run weight-only by design ({LAYERS[1]}): nothing to do" in r.output
    warnings = [x for x in r.output.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and f"1 quantized layer(s) without an activation range in the stats ({LAYERS[2]})" \
        in warnings[0] and "calibrate with inputs that reach them" in warnings[0]
    assert LAYERS[1] not in warnings[0]
