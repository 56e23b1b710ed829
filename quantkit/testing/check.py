"""``check_quantizer``: run the battery against anyone's ``fn(x) -> (codes, scale)``.

Each case is checked in this order, and the first broken rule is reported:

1. the call: no exception, the input untouched;
2. the contract: codes float8_e4m3fn of x's shape, scale float32 of the granularity's shape;
3. the scale as a number: positive and finite everywhere (an all-zero group too);
4. the codes *given the quantizer's own scale*: ``RNE(clamp(float32(x) / scale, +-448))``
   from the independent reference encoder (``x * (1 / scale)`` in float32 is accepted too);
   a mismatch is explained as missing clamp, round-toward-zero, ties away, a bf16/fp16
   quotient or an ignored edge tile where the codes fit that pattern;
5. the scale rule (unless ``scale_rule="any"``): ``float32(absmax / 448)`` per group within
   ``scale_rtol``; a mismatch is explained as absmax over 127 (or another wrong max), a float16 or
   bfloat16 scale, or an ignored edge tile;
6. the round trip ``codes * scale`` against x: SQNR at least the case's floor.

The codes compare by value: +0 and -0 are equal, any NaN code equals any other.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import reference as R
from .battery import DTYPES, Case, cases
from .conventions import (BLOCK, Convention, Granularity, Precision, absmax, as_2d, expand, quotient, round_to,
                          scale_shape)
from .rules import Failure, QuantizerCheckFailed, QuantizerSpecError, Rule, ScaleRule

Quantizer = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
E4M3_MAX = R.E4M3FN.max_finite
DEFAULT_SCALE_RTOL = 2.0 ** -20    # a few float32 ulps: x / 448 in float32 or float64, or x * (1 / 448)


@dataclass
class Report:
    """What ``check_quantizer`` ran and found: ``failure`` is None when every case passed."""

    granularity: Granularity
    cases: list[str] = field(default_factory=list)      # labels of the cases that passed
    min_sqnr_db: float = math.inf                       # lowest SQNR over the cases with a floor
    failure: Failure | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None

    def summary(self) -> str:
        head = f"{len(self.cases)} cases per {self.granularity.value}"
        if self.failure is not None:
            return f"FAIL after {head}: {self.failure}"
        return f"ok: {head} passed; lowest SQNR on Gaussian weights {self.min_sqnr_db:.1f} dB"


def load_quantizer(spec: str) -> Quantizer:
    """The callable named by ``"module:function"`` (``"module:Class.method"`` works too).

    >>> load_quantizer("math:sqrt")(4.0)
    2.0
    """
    module_name, colon, attr = spec.partition(":")
    if not (colon and module_name and attr):
        raise QuantizerSpecError(f"{spec!r} is not MODULE:FUNCTION (e.g. mypkg.fp8:quantize_weight)")
    try:
        obj = importlib.import_module(module_name)
    except SystemExit as exc:  # a script's sys.exit() at import time would end the check unseen
        raise QuantizerSpecError(f"importing {module_name!r} called sys.exit({exc.code!r}): "
                                 "guard the script's code with `if __name__ == '__main__':`") from exc
    except Exception as exc:   # noqa: BLE001  a module that fails to import is bad input, whatever it raises
        raise QuantizerSpecError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise QuantizerSpecError(f"{module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise QuantizerSpecError(f"{spec} is not a function (it is of type {type(obj).__name__})")
    return obj


def check_quantizer(fn: Quantizer, granularity: Granularity | str = Granularity.TENSOR, *,
                    dtypes=DTYPES, scale_rule: ScaleRule | str = ScaleRule.ABSMAX,
                    scale_rtol: float = DEFAULT_SCALE_RTOL, examples: int = 0) -> Report:
    """Check ``fn(x) -> (codes, scale)`` on the battery; raise ``QuantizerCheckFailed`` naming
    the first broken rule, or return the report.

    ``scale_rule="any"`` accepts any positive scale (a calibrated or clipping quantizer) and
    checks only the codes for it and the round trip. ``scale_rtol`` is how far a scale may be from
    float32(absmax / 448), relatively (2**-8 accepts bf16-rounded scales). ``examples`` > 0 adds that many weights
    drawn by hypothesis (``strategies.weights``), a failing one shrunk to the simplest.

    >>> from quantkit import fp8
    >>> def mine(x):
    ...     scale = fp8.scale_from_absmax(fp8.absmax(x, fp8.Granularity.CHANNEL))
    ...     return fp8.quantize(x, scale, fp8.Granularity.CHANNEL), scale
    >>> check_quantizer(mine, "channel").passed
    True
    """
    granularity, scale_rule = Granularity(granularity), ScaleRule.parse(scale_rule)
    _check_rtol(scale_rtol)
    report = Report(granularity)
    for case in cases(dtypes):
        failure = _check(fn, case, granularity, scale_rule, scale_rtol, report)
        if failure is not None:
            report.failure = failure
            raise QuantizerCheckFailed(failure)
        report.cases.append(case.label)
    if examples:
        _check_drawn(fn, granularity, report, examples, scale_rule, scale_rtol)
    return report


def _check_drawn(fn, granularity, report, examples, scale_rule, scale_rtol):
    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import NoSuchExample

    from .strategies import weights

    def failure(x):
        return _check(fn, Case("drawn by hypothesis", x, None), granularity, scale_rule, scale_rtol, None)
    try:
        # Derandomized: the same weights on every run, so a report can be reproduced.
        x = find(weights(), lambda x: failure(x) is not None, settings=settings(
            max_examples=examples, derandomize=True, database=None, deadline=None,
            phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck)))
    except NoSuchExample:
        report.cases.append(f"{examples} weights drawn by hypothesis")
        return
    report.failure = failure(x)
    raise QuantizerCheckFailed(report.failure)


def check_case(fn: Quantizer, x: torch.Tensor, granularity: Granularity | str = Granularity.TENSOR, *,
               name: str = "given input", sqnr_floor: float | None = None,
               scale_rule: ScaleRule | str = ScaleRule.ABSMAX,
               scale_rtol: float = DEFAULT_SCALE_RTOL) -> Failure | None:
    """The first rule ``fn`` breaks on one finite 2-D input ``x``, or None: the building block of
    ``check_quantizer``, for your own property tests (see ``strategies``)."""
    if x.dim() != 2:
        raise ValueError(f"check_case takes a 2-D weight [out, in], not {list(x.shape)}: "
                         "view conv kernels as [out, -1]")
    _check_rtol(scale_rtol)
    return _check(fn, Case(name, x.detach(), sqnr_floor), Granularity(granularity), ScaleRule.parse(scale_rule),
                  scale_rtol, None)


def _check_rtol(scale_rtol: float) -> None:
    # NaN compares false with everything: a NaN tolerance would fail every correct scale.
    if not (isinstance(scale_rtol, (int, float)) and math.isfinite(scale_rtol) and scale_rtol >= 0):
        raise ValueError(f"scale_rtol must be a finite number >= 0 (e.g. 0.004), not {scale_rtol!r}")


def _check(fn: Quantizer, case: Case, granularity: Granularity, scale_rule: ScaleRule, scale_rtol: float,
           report: Report | None) -> Failure | None:
    x = case.x
    before = x.clone()
    try:
        out = fn(x)
    except SystemExit as exc:  # sys.exit() inside the quantizer is a crash, not the checker's own exit
        return Failure(Rule.CRASHED, case.label, f"called sys.exit({exc.code!r})")
    except Exception as exc:   # noqa: BLE001  any exception of the user's code is the finding
        return Failure(Rule.CRASHED, case.label, f"{type(exc).__name__}: {exc}")
    if not torch.equal(_bytes(x), _bytes(before)):   # bytes: NaN is unequal to itself
        return Failure(Rule.MUTATED_INPUT, case.label, "x differs after the call")
    rows, cols = x.shape
    problem = _contract(out, rows, cols, granularity)
    if problem:
        return Failure(Rule.CONTRACT, case.label, problem)
    if x.numel() == 0:
        return None    # no values: a scale for nothing can be anything
    codes = out[0].detach().cpu().contiguous().view(torch.uint8).numpy().reshape(rows, cols)
    scale = out[1].detach().cpu().reshape(scale_shape(rows, cols, granularity)).numpy()
    x2 = as_2d(x.float().numpy())
    amax = absmax(x2, granularity)
    return (_check_scale_values(case, granularity, x2, codes, scale, amax)
            or _check_codes(case, granularity, x2, codes, scale)
            or (_check_scale_rule(case, granularity, x2.shape, scale, amax, scale_rtol)
                if scale_rule is ScaleRule.ABSMAX else None)
            or _check_sqnr(case, granularity, x2, codes, scale, report))


def _contract(out, rows: int, cols: int, granularity: Granularity) -> str | None:
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        return f"returned {type(out).__name__}, want a tuple (codes, scale) of two tensors"
    codes, scale = out
    if codes.dtype != torch.float8_e4m3fn:
        return f"codes are {codes.dtype}, want torch.float8_e4m3fn"
    if tuple(codes.shape) != (rows, cols):
        return f"codes shaped {list(codes.shape)}, want x's shape {[rows, cols]}"
    if scale.dtype != torch.float32:
        return f"scale is {scale.dtype}, want torch.float32"
    want = scale_shape(rows, cols, granularity)
    # Shapes that hold the same numbers in the same order are accepted ([1] or [1, 1] per tensor,
    # [out] per channel); anything else would broadcast wrongly in a loader.
    same = {Granularity.TENSOR: {(), (1,), (1, 1)}, Granularity.CHANNEL: {(rows, 1), (rows,)},
            Granularity.BLOCK: {want}}[granularity]
    if tuple(scale.shape) not in same:
        edge = " (edge tiles need scales too: ceil, not floor)" if granularity is Granularity.BLOCK else ""
        return f"scale shaped {list(scale.shape)}, want {list(want)}{edge}"
    return None


def _group_label(granularity: Granularity, idx: tuple[int, ...], rows: int, cols: int) -> str:
    if granularity is Granularity.TENSOR:
        return "the tensor"
    if granularity is Granularity.CHANNEL:
        return f"row {idx[0]}"
    i, j = idx
    r1, c1 = min(rows, (i + 1) * BLOCK), min(cols, (j + 1) * BLOCK)
    edge = ", an edge tile" if (r1 - i * BLOCK) < BLOCK or (c1 - j * BLOCK) < BLOCK else ""
    return f"block {list(idx)} (rows {i * BLOCK}..{r1 - 1}, columns {j * BLOCK}..{c1 - 1}{edge})"


def _is_edge_group(granularity: Granularity, idx, rows: int, cols: int) -> bool:
    return (granularity is Granularity.BLOCK
            and (min(rows, (idx[0] + 1) * BLOCK) - idx[0] * BLOCK < BLOCK
                 or min(cols, (idx[1] + 1) * BLOCK) - idx[1] * BLOCK < BLOCK))


def _check_scale_values(case, granularity, x2, codes, scale, amax) -> Failure | None:
    bad = ~(np.isfinite(scale) & (scale > 0))
    if not bad.any():
        return None
    idx = tuple(int(i) for i in np.argwhere(bad)[0]) if scale.ndim else ()
    rows, cols = x2.shape
    where = _group_label(granularity, idx, rows, cols)
    s, a = float(scale[idx]), float(amax[idx])
    nan_codes = int(R.is_nan_code(codes).sum())
    if a == 0:
        seen = (f"{nan_codes} codes are NaN" if nan_codes else
                "its codes are 0, but whoever divides by this scale gets NaN or inf")
        return Failure(Rule.ZERO_SCALE, case.label, f"{where} is all zeros and got scale {s!r}; {seen}",
                       idx, a, None, s)
    if s == 0:
        with np.errstate(under="ignore"):
            in_fp16 = float(np.float16(a) / np.float16(E4M3_MAX))
        rule, note = ((Rule.SCALE_FLOAT16, ": absmax / 448 is 0 in float16") if in_fp16 == 0
                      else (Rule.SCALE_UNDERFLOW, ""))
        return Failure(rule, case.label, f"{where} has absmax {a:.4g} and scale 0{note}",
                       idx, a, float(np.float32(a / E4M3_MAX)), s)
    return Failure(Rule.BAD_SCALE, case.label, f"{where} has absmax {a:.4g} and scale {s!r}", idx, a, None, s)


def _first(mask: np.ndarray) -> tuple[int, int]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_codes(case, granularity, x2, codes, scale) -> Failure | None:
    rows, cols = x2.shape
    full = expand(scale, rows, cols, granularity)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        q = x2 / full
        q_reciprocal = x2 * (np.float32(1) / full)
    want = R.encode(q)
    ok = _same_value(codes, want) | _same_value(codes, R.encode(q_reciprocal))
    if ok.all():
        return None
    bad = ~ok
    r, c = _first(bad)
    seen = (f"element [{r}, {c}]: x = {float(x2[r, c])!r}, x / scale = {float(q[r, c])!r}, "
            f"code {_code(codes[r, c])}, want {_code(want[r, c])}; {int(bad.sum())} of {bad.size} codes differ")
    rule = _explain_codes(granularity, x2, full, q, codes, bad)
    return Failure(rule, case.label, seen, (r, c), float(x2[r, c]), int(want[r, c]), int(codes[r, c]))


def _explain_codes(granularity, x2, full, q, codes, bad) -> Rule:
    rows, cols = x2.shape
    got = codes[bad]
    if (R.is_nan_code(got) & (np.abs(q[bad]) > E4M3_MAX)).any():
        return Rule.MISSING_CLAMP
    for rule, alternative in (
            (Rule.ROUND_TOWARD_ZERO, lambda: R.encode(q, rounding=R.Rounding.TOWARD_ZERO)),
            (Rule.ROUND_TIES_AWAY, lambda: R.encode(q, rounding=R.Rounding.NEAREST_AWAY)),
            (Rule.LOW_PRECISION_QUOTIENT, lambda: R.encode(round_to(q, Precision.BFLOAT16))),
            (Rule.LOW_PRECISION_QUOTIENT, lambda: R.encode(round_to(q, Precision.FLOAT16))),
            (Rule.LOW_PRECISION_QUOTIENT, lambda: R.encode(quotient(x2, full, Convention.COMFYUI, Precision.BFLOAT16))),
            (Rule.LOW_PRECISION_QUOTIENT, lambda: R.encode(quotient(x2, full, Convention.COMFYUI, Precision.FLOAT16)))):
        if _same_value(got, alternative()[bad]).all():
            return rule
    if granularity is Granularity.BLOCK:
        tiles = {(int(r) // BLOCK, int(c) // BLOCK) for r, c in np.argwhere(bad)}
        if all(_is_edge_group(granularity, t, rows, cols) for t in tiles):
            return Rule.EDGE_TILES
    return Rule.CODE_MISMATCH


def _check_scale_rule(case, granularity, shape, scale, amax, rtol) -> Failure | None:
    want = (amax / E4M3_MAX).astype(np.float32)      # the reference: float64 quotient, float32 result
    nonzero = amax > 0
    # Relative to the smallest normal float32 at least: below it a float32 (let alone a bf16) has
    # fewer significant bits, so a subnormal scale's rounding is measured against 2^-126.
    rel = np.abs(scale.astype(np.float64) - want) / np.maximum(want, np.finfo(np.float32).tiny)
    bad = nonzero & ~(rel <= rtol)
    if not bad.any():
        return None
    idx = tuple(int(i) for i in np.argwhere(bad)[0]) if scale.ndim else ()
    s, a, w = float(scale[idx]), float(amax[idx]), float(want[idx])
    seen = (f"{_group_label(granularity, idx, *shape)}: absmax {a:.6g}, "
            f"scale {s:.6g}, want absmax / 448 = {w:.6g} (absmax / scale = {a / s:.5g})")
    rule, note = _explain_scale(granularity, shape, want, bad, idx, a, s)
    return Failure(rule, case.label, seen + note, idx, a, w, s)


def _explain_scale(granularity, shape, want, bad, idx, a, s) -> tuple[Rule, str]:
    # Exact signatures first (a narrow type's rounding), then the approximate one (a ratio).
    with np.errstate(over="ignore", under="ignore"):
        as_fp16 = np.float16(np.float16(a) / np.float16(E4M3_MAX))
    if s in (float(as_fp16), float(np.float16(want[idx]))):
        return Rule.SCALE_FLOAT16, "; it equals absmax / 448 computed in float16"
    if s == float(round_to(want[idx], Precision.BFLOAT16)):
        return Rule.SCALE_BFLOAT16, "; it equals absmax / 448 rounded to bfloat16"
    ratio = a / s
    for m in (127.0, 127.5, 255.0, 240.0, 57344.0, 1.0):
        if abs(ratio / m - 1) < 0.01:
            return Rule.WRONG_MAX, f"; the scale divides absmax by {m:g}, not 448"
    if granularity is Granularity.BLOCK and all(_is_edge_group(granularity, tuple(t), *shape)
                                                for t in np.argwhere(bad)):
        return Rule.EDGE_TILES, "; only edge tiles are wrong"
    return Rule.SCALE_MISMATCH, ""


def _check_sqnr(case, granularity, x2, codes, scale, report) -> Failure | None:
    if case.sqnr_floor is None:
        return None
    rows, cols = x2.shape
    w = R.decode(codes) * expand(scale, rows, cols, granularity).astype(np.float64)
    x = x2.astype(np.float64)
    err = float(np.sum((x - w) ** 2))
    db = math.inf if err == 0 else 10 * math.log10(float(np.sum(x * x)) / err)
    if report is not None:
        report.min_sqnr_db = min(report.min_sqnr_db, db)
    if db >= case.sqnr_floor:
        return None
    return Failure(Rule.SQNR_FLOOR, case.label, f"SQNR {db:.1f} dB, want at least {case.sqnr_floor:.0f} dB",
                   None, None, case.sqnr_floor, db)


def _same_value(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Equal codes, or both zeros (+0 / -0), or both NaN."""
    return R.same_codes(a, b) | (((a & 0x7F) == 0) & ((b & 0x7F) == 0))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _code(c) -> str:
    v = float(R.decode(np.uint8(c)))
    return f"0x{int(c):02x} ({v:g})"
