"""What a failed check can break, and the one-line report naming it."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class ScaleRule(enum.Enum):
    """What a scale must be: ABSMAX, absmax / 448 per group; ANY, any positive finite value (a
    calibrated or clipping quantizer: only the codes for its scale and the round trip are checked)."""
    ABSMAX = "absmax"
    ANY = "any"

    @classmethod
    def parse(cls, value: "ScaleRule | str") -> "ScaleRule":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"scale_rule must be one of {[r.value for r in cls]}, not {value!r}") from None


class Rule(enum.Enum):
    """A rule of FP8 (E4M3) weight quantization; ``value`` is (name, how to fix it)."""

    CRASHED = ("the quantizer raised", "every 2-D float tensor must quantize, including 0 rows and 1 element")
    MUTATED_INPUT = ("the input was modified", "quantize a copy; never write into the caller's weight")
    CONTRACT = ("wrong output contract", "return (codes, scale): codes float8_e4m3fn of x's shape, scale float32 "
                "shaped [] per tensor, [out, 1] per channel, [ceil(out/128), ceil(in/128)] per block")
    ZERO_SCALE = ("NaN for zero scale", "an all-zero row, tile or tensor has absmax 0: give it a positive scale "
                  "(quantkit uses 1), never 0, so that 0 / scale is 0, not NaN")
    SCALE_UNDERFLOW = ("scale underflow", "compute absmax / 448 in float32 (or float64) and keep a nonzero "
                       "group's scale above 0")
    SCALE_FLOAT16 = ("scale computed in float16", "compute absmax / 448 in float32: in float16 it loses precision "
                     "below absmax 0.027 and underflows to 0 below 1.4e-5 (tiny tensors get 448 or NaN codes)")
    SCALE_BFLOAT16 = ("scale rounded to bfloat16", "compute and store the scale in float32; if this convention "
                      "(torchao's and compressed-tensors' default for bf16 weights) is intended, pass "
                      "scale_rtol=2**-8 (check-math --scale-rtol 0.004)")
    BAD_SCALE = ("scale not a positive finite number", "scale = absmax / 448 per group, positive and finite")
    MISSING_CLAMP = ("missing clamp", "clamp x / scale to [-448, 448] before the cast: torch >= 2.12 saturates, "
                     "but ml_dtypes and older torch give NaN past 464")
    ROUND_TOWARD_ZERO = ("rounding mode: round-toward-zero", "round to nearest, ties to even "
                         "(torch's cast to float8_e4m3fn does it; do not truncate)")
    ROUND_TIES_AWAY = ("rounding mode: ties away from zero", "round to nearest, ties to even "
                       "(torch's cast does it; floor(v + 0.5) does not)")
    LOW_PRECISION_QUOTIENT = ("x / scale rounded to bf16 or fp16 before the cast", "widen x and the scale to "
                              "float32 before dividing (a 0-dim float32 scale does not promote a bf16 tensor): a bf16 "
                              "quotient, or x times a bf16 1 / scale, is rounded twice")
    EDGE_TILES = ("edge tiles ignored", "when out or in is not a multiple of 128, the last row/column of tiles is "
                  "smaller; each needs its own absmax and scale, and its elements their codes")
    WRONG_MAX = ("wrong max", "scale = absmax / 448, the largest E4M3 value (127 is INT8's maximum, 240 "
                 "E4M3FNUZ's, 57344 E5M2's)")
    SCALE_MISMATCH = ("scale is not absmax / 448", "scale = max |x| of the group / 448, in float32")
    CODE_MISMATCH = ("codes differ from round-to-nearest-even of clamp(x / scale)",
                     "code = cast(clamp(float32(x) / scale, -448, 448)), rounded to nearest, ties to even")
    SQNR_FLOOR = ("round trip below the SQNR floor", "codes * scale must reconstruct x; check the scale "
                  "and the codes")

    @property
    def title(self) -> str:
        return self.value[0]

    @property
    def fix(self) -> str:
        return self.value[1]


@dataclass(frozen=True)
class Failure:
    """The first thing found wrong: the rule broken, on which case, and what was seen there."""

    rule: Rule
    case: str                          # the battery case's label (name, dtype, shape)
    detail: str                        # the first mismatch: index, input value, expected vs actual
    index: tuple[int, ...] | None = None
    value: float | None = None         # the input element (or the group's absmax, for a scale)
    expected: int | float | None = None
    actual: int | float | None = None

    def __str__(self) -> str:
        line = f"{self.rule.title}: {self.case}: {self.detail}. Fix: {self.rule.fix}."
        return " ".join(line.split())   # one line, whatever the quantizer's exception said


class QuantizerCheckFailed(AssertionError):
    """Raised by ``check_quantizer``; ``failure`` says what broke. An AssertionError, so pytest
    shows the message as a test failure."""

    def __init__(self, failure: Failure):
        self.failure = failure
        super().__init__(str(failure))


class QuantizerSpecError(ValueError):
    """A ``module:function`` that cannot be loaded as a quantizer."""
