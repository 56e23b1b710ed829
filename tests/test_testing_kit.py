"""quantkit.testing: the kit passes correct quantizers and names each known bug.

The bar (issue 13): quantkit's quantizer and a correct third-party one (compressed-tensors with
float32 scales) pass; /127 scales, round-toward-zero, float16 scales, a block quantizer that
ignores edge tiles, NaN codes for a zero scale and a clipping quantizer without a clamp (cast
by ml_dtypes, NaN on overflow) each fail with a message naming the bug, from the library and
from ``quantkit check-math`` (exit 1; 0 when correct; 2 for bad input).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import buggy_quantizers as B
import peer_quantizers as P
from quantkit.cli import main
from quantkit.fp8 import Granularity as G
from quantkit.testing import (Convention, Precision, QuantizerCheckFailed, QuantizerSpecError, Rule, check_case,
                              check_quantizer, load_quantizer)
from quantkit.testing import conventions as C
from quantkit.testing import reference as R
from quantkit.testing import strategies as qs
from quantkit.testing.battery import cases

TESTS = pathlib.Path(__file__).resolve().parent

# (quantizer, granularity, keyword arguments, the rule it breaks, words the message must hold)
BUGS = [
    ("divides_by_127", "tensor", {}, Rule.WRONG_MAX, "divides absmax by 127, not 448"),
    ("rounds_toward_zero", "tensor", {}, Rule.ROUND_TOWARD_ZERO, "round-toward-zero"),
    ("rounds_ties_away", "tensor", {}, Rule.ROUND_TIES_AWAY, "x / scale = -0.65625, code 0xb3 (-0.6875), want 0xb2"),
    ("float16_scale", "tensor", {}, Rule.SCALE_FLOAT16, "computed in float16"),
    ("bfloat16_scale", "channel", {}, Rule.SCALE_BFLOAT16, "it equals absmax / 448 rounded to bfloat16"),
    ("block_ignores_edge_tiles", "block", {}, Rule.EDGE_TILES, "an edge tile"),
    ("zero_scale_nan", "channel", {}, Rule.ZERO_SCALE, "is all zeros and got scale 0.0"),
    ("clipping_without_clamp", "channel", {"scale_rule": "any"}, Rule.MISSING_CLAMP, "code 0x7f (nan), want 0x7e"),
    ("clipping_without_clamp", "channel", {}, Rule.MISSING_CLAMP, "clamp x / scale to [-448, 448]"),
]
CORRECT = [("quantkit_tensor", "tensor", {}), ("quantkit_channel", "channel", {}), ("quantkit_block", "block", {}),
           ("correct_tensor", "tensor", {}), ("correct_channel", "channel", {}), ("correct_block", "block", {}),
           ("clipping_with_clamp", "channel", {"scale_rule": "any"})]


@pytest.mark.parametrize("name,gran,kwargs,rule,words", BUGS, ids=[b[0] + "-" + b[1] for b in BUGS])
def test_each_known_bug_is_named(name, gran, kwargs, rule, words):
    with pytest.raises(QuantizerCheckFailed) as info:
        check_quantizer(getattr(B, name), gran, **kwargs)
    failure = info.value.failure
    assert failure.rule is rule, str(failure)
    message = str(info.value)
    assert message.startswith(rule.title + ": case '") and words in message and "Fix: " in message
    assert "\n" not in message


def test_the_first_mismatch_is_reported_with_its_values():
    with pytest.raises(QuantizerCheckFailed) as info:
        check_quantizer(B.rounds_toward_zero, "tensor")
    f = info.value.failure
    assert f.index == (0, 0) and f.actual == f.expected - 1        # truncated one step below RNE
    assert f"x = {f.value!r}" in f.detail and f"0x{f.expected:02x}" in f.detail and f"0x{f.actual:02x}" in f.detail


@pytest.mark.parametrize("name,gran,kwargs", CORRECT, ids=[c[0] for c in CORRECT])
def test_correct_quantizers_pass(name, gran, kwargs):
    report = check_quantizer(getattr(B, name), gran, **kwargs)
    assert report.passed and len(report.cases) == 42 and report.min_sqnr_db >= 25.0
    assert report.summary().startswith("ok: 42 cases")


def test_a_clipping_scale_fails_the_absmax_rule_by_name():
    with pytest.raises(QuantizerCheckFailed) as info:
        check_quantizer(B.clipping_with_clamp, "channel")
    assert info.value.failure.rule is Rule.SCALE_MISMATCH and "want absmax / 448" in str(info.value)


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_compressed_tensors_with_float32_scales_passes(strategy):
    report = check_quantizer(P.compressed_tensors_fp8(strategy), strategy)
    assert report.passed and report.min_sqnr_db >= 30.0


# ---------------------------------------------------------------------------------------------
# the output contract, crashes, mutation, drawn examples
# ---------------------------------------------------------------------------------------------

def _with(fn, change):
    return lambda x: change(*fn(x))


@pytest.mark.parametrize("fn,gran,words", [
    (lambda x: B.correct_tensor(x)[0], "tensor", "returned Tensor, want a tuple (codes, scale)"),
    (_with(B.correct_tensor, lambda q, s: (q.view(torch.uint8), s)), "tensor", "codes are torch.uint8"),
    (_with(B.correct_tensor, lambda q, s: (q.flatten(), s)), "tensor", "codes shaped [98304]"),
    (_with(B.correct_tensor, lambda q, s: (q, s.bfloat16())), "tensor", "scale is torch.bfloat16"),
    (_with(B.correct_channel, lambda q, s: (q, s.reshape(1, -1))), "channel", "scale shaped [1, 256], want [256, 1]"),
    (_with(B.correct_block, lambda q, s: (q, s[:1, :1])), "block", "want [2, 3] (edge tiles need scales too"),
], ids=["not-a-tuple", "uint8-codes", "flat-codes", "bf16-scale", "row-scale", "floor-tiles"])
def test_contract_violations(fn, gran, words):
    with pytest.raises(QuantizerCheckFailed) as info:
        check_quantizer(fn, gran)
    assert info.value.failure.rule is Rule.CONTRACT and words in str(info.value)


def test_equivalent_scale_shapes_are_accepted():
    check_quantizer(_with(B.correct_tensor, lambda q, s: (q, s.reshape(1, 1))), "tensor")
    check_quantizer(_with(B.correct_channel, lambda q, s: (q, s.flatten())), "channel")


def test_a_crash_and_a_mutated_input_are_failures():
    def crashes_on_empty(x):
        if x.shape[0] == 0:
            raise ValueError("no rows\nat all")
        return B.correct_tensor(x)

    def scales_in_place(x):
        out = B.correct_tensor(x)
        x.mul_(2)
        return out
    with pytest.raises(QuantizerCheckFailed, match=r"the quantizer raised: case 'no rows' \(bfloat16 \[0, 64\]\): "
                                                    r"ValueError: no rows at all"):
        check_quantizer(crashes_on_empty, "tensor")
    with pytest.raises(QuantizerCheckFailed, match="the input was modified"):
        check_quantizer(scales_in_place, "tensor")


def test_drawn_examples_shrink_to_a_small_failing_weight():
    with pytest.raises(QuantizerCheckFailed) as info:
        check_quantizer(B.block_ignores_edge_tiles, "block", dtypes=(), examples=30)
    f = info.value.failure
    assert f.rule is Rule.EDGE_TILES and "drawn by hypothesis" in f.case
    assert re.search(r"\[(\d+), (\d+)\]", f.case).group(0) == "[1, 1]"   # shrunk to one element


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"scale_rule must be one of \['absmax', 'any'\], not 'clip'"):
        check_quantizer(B.correct_tensor, "tensor", scale_rule="clip")
    with pytest.raises(ValueError):
        check_quantizer(B.correct_tensor, "row")
    with pytest.raises(ValueError, match=r"2-D weight \[out, in\], not \[4, 3, 3\]"):
        check_case(B.correct_tensor, torch.ones(4, 3, 3))


def test_a_zero_scale_with_zero_codes_is_still_named():
    def zero_scale_zero_codes(x):
        codes, scale = B.zero_scale_nan(x)
        return torch.where(scale == 0, 0.0, codes.float()).to(torch.float8_e4m3fn), scale
    failure = check_case(zero_scale_zero_codes, torch.zeros(3, 5), "channel")
    assert failure.rule is Rule.ZERO_SCALE and "codes are 0, but whoever divides" in str(failure)


@pytest.mark.parametrize("spec,words", [
    ("buggy_quantizers", "is not MODULE:FUNCTION"), ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("buggy_quantizers:missing", "has no 'missing'"), ("buggy_quantizers:not_callable", "not a function"),
])
def test_load_quantizer_refuses_by_name(spec, words):
    with pytest.raises(QuantizerSpecError, match=re.escape(words)):
        load_quantizer(spec)


# ---------------------------------------------------------------------------------------------
# quantkit check-math
# ---------------------------------------------------------------------------------------------

def check_math(*args):
    return CliRunner().invoke(main, ["check-math", *args])


@pytest.mark.parametrize("name,gran,kwargs,rule,words", BUGS, ids=[b[0] + "-" + b[1] for b in BUGS])
def test_cli_exits_1_naming_the_bug(name, gran, kwargs, rule, words):
    extra = ["--scale", kwargs["scale_rule"]] if kwargs else []
    result = check_math(f"buggy_quantizers:{name}", "--granularity", gran, *extra)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"FAIL buggy_quantizers:{name} --granularity {gran}: {rule.title}")
    assert words in lines[0]


@pytest.mark.parametrize("name,gran,kwargs", CORRECT[:3] + CORRECT[-1:], ids=lambda v: str(v))
def test_cli_exits_0_on_correct_quantizers(name, gran, kwargs):
    extra = ["--scale", kwargs["scale_rule"]] if kwargs else []
    result = check_math(f"buggy_quantizers:{name}", "--granularity", gran, *extra)
    assert result.exit_code == 0, result.output
    assert "ok: 42 cases per" in result.output and len(result.output.splitlines()) == 1


def test_cli_scale_tolerance_accepts_a_bf16_scale_convention():
    result = check_math("buggy_quantizers:bfloat16_scale", "--granularity", "channel", "--scale-rtol", "0.004")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args", [["no_such_module_xyz:f"], ["buggy_quantizers:not_callable"], ["buggy_quantizers"],
                                  ["buggy_quantizers:correct_tensor", "--granularity", "row"],
                                  ["buggy_quantizers:correct_tensor", "--examples", "-1"],
                                  ["buggy_quantizers:correct_tensor", "--scale-rtol", "-1"]])
def test_cli_exits_2_on_bad_input(args):
    result = check_math(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_cli_in_a_real_process_from_the_quantizers_folder():
    """The console command finds a module in the current folder and prints one line, no traceback."""
    command = pathlib.Path(sys.executable).with_name("quantkit")
    assert command.exists(), "the quantkit console script is installed with the package"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(command), "check-math", "buggy_quantizers:divides_by_127"], cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == "", done.stderr
    assert len(done.stdout.splitlines()) == 1
    assert done.stdout.startswith("FAIL buggy_quantizers:divides_by_127 --granularity tensor: wrong max: ")


# ---------------------------------------------------------------------------------------------
# the reference conventions reproduce the peers bit for bit, and their known differences show
# ---------------------------------------------------------------------------------------------

def _agrees(fn, gran: G, convention: Convention, skip=()):
    """Codes and scales of ``fn`` equal the reference convention's on every battery case."""
    for case in cases():
        if case.name in skip:
            continue
        codes, scale = fn(case.x)
        want_codes, want_scale = C.quantize(case.x.float().numpy(), gran, convention,
                                            Precision(str(case.x.dtype).removeprefix("torch.")))
        got = codes.contiguous().view(torch.uint8).numpy().reshape(want_codes.shape)
        same = R.same_codes(got, want_codes) | (((got | want_codes) & 0x7F) == 0)   # +0 / -0
        assert same.all(), f"{case.label}: {(~same).sum()} codes differ"
        assert np.array_equal(scale.float().numpy().reshape(want_scale.shape), want_scale, equal_nan=True), case.label


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_compressed_tensors_default_is_its_reference_convention(strategy):
    fn = P.compressed_tensors_fp8(strategy, float32_scales=False)
    _agrees(fn, G(strategy), Convention.COMPRESSED_TENSORS)
    with pytest.raises(QuantizerCheckFailed) as info:    # bf16 scales: x / scale is rounded to bf16
        check_quantizer(fn, strategy)
    assert info.value.failure.rule is Rule.LOW_PRECISION_QUOTIENT


def test_comfyui_runtime_quantize_is_its_reference_convention():
    pytest.importorskip("comfy_kitchen")
    _agrees(P.comfy_kitchen_fp8, G.TENSOR, Convention.COMFYUI, skip={"no rows"})
    with pytest.raises(QuantizerCheckFailed) as info:    # x * bf16(1 / scale), in bf16
        check_quantizer(P.comfy_kitchen_fp8, "tensor")
    assert info.value.failure.rule is Rule.LOW_PRECISION_QUOTIENT


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_torchao_is_its_reference_convention(gran):
    pytest.importorskip("torchao", reason="torchao is not a test dependency (pip install torchao to run this)")
    _agrees(P.torchao_from_hp(gran), G(gran), Convention.TORCHAO, skip={"no rows", "one column"})
    with pytest.raises(QuantizerCheckFailed) as info:
        check_quantizer(P.torchao_from_hp(gran), gran)
    assert info.value.failure.rule is Rule.SCALE_BFLOAT16
    with pytest.raises(QuantizerCheckFailed) as info:
        check_quantizer(P.torchao_from_hp(gran, float32_input=True), gran)
    # Per tensor: NaN codes for an all-zero tensor. Per row: from_hp raises on a [129, 1] weight.
    assert info.value.failure.rule is (Rule.ZERO_SCALE if gran == "tensor" else Rule.CRASHED)


def test_reference_conventions_agree_on_float32_weights_away_from_zero():
    x = torch.randn(200, 300) * 0.02
    for gran in G:
        codes, scale = C.quantize(x.numpy(), gran)
        for convention in (Convention.COMPRESSED_TENSORS, Convention.TORCHAO):
            c, s = C.quantize(x.numpy(), gran, convention)
            assert np.array_equal(c, codes) and np.array_equal(s, scale)


# ---------------------------------------------------------------------------------------------
# the kit's own pieces: narrow rounding, rounding modes, strategies
# ---------------------------------------------------------------------------------------------

def test_round_to_matches_torch_casts():
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2 ** 32, 1 << 18, dtype=np.uint64).astype(np.uint32),
                           (np.arange(1 << 16, dtype=np.uint32) << 16) | 0x8000,      # every bf16 tie
                           np.array([0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x477FF000], np.uint32)])
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    for precision, dtype in ((Precision.BFLOAT16, torch.bfloat16), (Precision.FLOAT16, torch.float16)):
        want = torch.from_numpy(x.copy()).to(dtype).float().numpy()
        assert np.array_equal(C.round_to(x, precision), want)


@pytest.mark.parametrize("spec", [R.E4M3FN, R.E5M2], ids=lambda s: s.name)
def test_wrong_rounding_modes_by_brute_force(spec):
    x = R.neighbours_of_midpoints(spec)
    x = x[np.abs(x) <= spec.max_finite]
    codes = np.arange(0x80)
    values = R.decode(codes, spec)
    codes, values = codes[np.isfinite(values)], values[np.isfinite(values)]
    a = np.abs(x.astype(np.float64))
    below = values[np.searchsorted(values, a, side="right") - 1]                      # largest value <= |x|
    above = values[np.minimum(np.searchsorted(values, a, side="left"), len(values) - 1)]
    toward_zero = np.copysign(below, x)
    away = np.copysign(np.where(a - below >= above - a, above, below), x)            # ties go up in magnitude
    got_tz = R.decode(R.encode(x, spec, rounding=R.Rounding.TOWARD_ZERO), spec)
    got_aw = R.decode(R.encode(x, spec, rounding=R.Rounding.NEAREST_AWAY), spec)
    assert np.array_equal(got_tz, toward_zero) and np.array_equal(got_aw, away)
    assert not np.array_equal(got_aw, R.decode(R.encode(x, spec), spec))             # ties do differ


def test_strategies_reach_the_corners():
    from hypothesis import find
    find(qs.shapes(), lambda s: s[0] == 0)
    find(qs.shapes(), lambda s: s[0] > 128 and s[0] % 128 and s[1] % 128)
    find(qs.weights(), lambda x: x.shape[0] and (x.float() == 0).all(dim=1).any())
    find(qs.weights(), lambda x: x.dtype is torch.float16)
    find(qs.weights(nonfinite=True), lambda x: bool(x.float().isnan().any()))
    def has_fp8_subnormals(x):     # |x| below 2^-12 of the absmax: x / scale under 448 * 2^-12 < 2^-6
        a = x.float().abs()
        return x.numel() > 1000 and bool((a[a > 0] < a.max() / 2 ** 12).any())
    find(qs.weights(), has_fp8_subnormals)


@settings(max_examples=3)
@given(x=qs.every_bf16_pattern())
def test_every_bf16_pattern_is_every_pattern(x):
    bits = np.sort(x.contiguous().view(torch.int16).numpy().view(np.uint16).ravel())
    assert x.dtype is torch.bfloat16 and x.shape in {(256, 256), (260, 253)}
    assert np.array_equal(np.unique(bits), np.arange(1 << 16))


@settings(max_examples=25)
@given(x=qs.weights(), gran=st.sampled_from(list(G)))
def test_quantkit_on_drawn_weights(x, gran):
    failure = check_case(lambda t: B._quantkit(t, gran), x, gran)
    assert failure is None, failure


def test_ml_dtypes_cast_is_the_nan_on_overflow_the_kit_expects():
    """The clipping fixture's premise: ml_dtypes gives NaN past 464 (torch 2.13 saturates)."""
    y = np.array([464.0, 465.0], np.float32)
    assert list(y.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)) == [0x7E, 0x7F]
    assert list(torch.from_numpy(y).to(torch.float8_e4m3fn).view(torch.uint8).tolist()) == [0x7E, 0x7E]


def test_the_docs_examples_run(capsys):
    """docs/testing.md's Python blocks run as written, in order, in one namespace (the torchao
    block where torchao is installed)."""
    blocks = re.findall(r"```python\n(.*?)```", (TESTS.parent / "docs" / "testing.md").read_text(), re.S)
    assert len(blocks) == 5
    namespace: dict = {}
    for block in blocks:
        if block.startswith("# Needs torchao") and importlib.util.find_spec("torchao") is None:
            continue
        exec(compile(block, "docs/testing.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "ok: 42 cases per channel passed; lowest SQNR on Gaussian weights 31.5 dB" in printed
    assert "x / scale rounded to bf16 or fp16 before the cast: case 'gaussian' (bfloat16" in printed


@pytest.mark.parametrize("module", ["reference", "conventions", "check"])
def test_docstring_examples(module):
    import doctest
    mod = importlib.import_module(f"quantkit.testing.{module}")
    result = doctest.testmod(mod)
    assert result.attempted and not result.failed
