"""Plan stage: decide every tensor's fate and every output tensor's dtype and shape.

A plan is computed from the header alone (no tensor data is read), so ``quantkit plan`` is
instant, and the writer can lay out the output's header before the first byte of data.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

from . import dtypes
from .dtypes import DType, Kind
from .errors import PolicyError, UnsupportedInputError
from .fp8 import E4M3FN, FP8Format, Granularity, scale_shape
from .policy import QUANTIZABLE, Action, Decision, Policy, Rule
from .reader import SafetensorsFile, TensorInfo


class KeepDtype(enum.Enum):
    """Precision of the floating-point tensors that are not quantized."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    SOURCE = "source"

    def resolve(self, source: DType) -> DType:
        return {KeepDtype.BF16: dtypes.BF16, KeepDtype.FP16: dtypes.F16,
                KeepDtype.FP32: dtypes.F32, KeepDtype.SOURCE: source}[self]


@dataclass(frozen=True)
class ConvertOptions:
    granularity: Granularity = Granularity.TENSOR
    fp8: FP8Format = E4M3FN
    format: str = "native"
    keep_dtype: KeepDtype = KeepDtype.BF16
    policy: Policy = field(default_factory=Policy)
    allow_nonfinite: bool = False

    @classmethod
    def from_strings(cls, *, granularity: str = "tensor", fp8: str = "float8_e4m3fn", format: str = "native",
                     keep_dtype: str = "bf16", rules: list[tuple[str, str]] = (), quantize_conv: bool = False,
                     allow_nonfinite: bool = False) -> "ConvertOptions":
        """Build options from CLI-style strings; ``rules`` are ``("quantize"|"keep", pattern)`` in order."""
        from .fp8 import FP8_FORMATS
        if fp8 not in FP8_FORMATS:
            raise PolicyError(f"unknown FP8 dtype {fp8!r}", hint=f"choose one of {', '.join(FP8_FORMATS)}")
        policy = Policy(tuple(Rule(Action(a), p) for a, p in rules), quantize_conv=quantize_conv)
        return cls(Granularity(granularity), FP8_FORMATS[fp8], format, KeepDtype(keep_dtype), policy, allow_nonfinite)


@dataclass(frozen=True)
class PlannedTensor:
    info: TensorInfo
    decision: Decision
    out_dtype: DType                  # dtype of the tensor under its own key in the output
    scale_shape: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def action(self) -> Action:
        return self.decision.action


@dataclass
class Plan:
    source: str
    options: ConvertOptions
    tensors: list[PlannedTensor]
    outputs: list = field(default_factory=list)   # list[formats.Emit], in file order
    warnings: list[str] = field(default_factory=list)

    def count(self, action: Action) -> int:
        return sum(1 for t in self.tensors if t.action is action)

    @property
    def bytes_in(self) -> int:
        return sum(t.info.nbytes for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(e.spec.nbytes for e in self.outputs)

    def quantized(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.action is Action.QUANTIZE]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.options.format,
            "granularity": self.options.granularity.value,
            "fp8": self.options.fp8.name,
            "keep_dtype": self.options.keep_dtype.value,
            "policy": self.options.policy.describe(),
            "counts": {a.value: self.count(a) for a in Action},
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "warnings": self.warnings,
            "tensors": [{"name": t.name, "shape": list(t.info.shape), "dtype": t.info.dtype.code,
                         "action": t.action.value, "kind": t.decision.kind.value, "reason": t.decision.reason,
                         "out_dtype": t.out_dtype.code,
                         "scale_shape": list(t.scale_shape) if t.scale_shape is not None else None}
                        for t in self.tensors],
        }


def plan_tensor(info: TensorInfo, options: ConvertOptions, path: str) -> PlannedTensor:
    decision = options.policy.decide(info.name, info.shape, info.dtype)
    if info.dtype.kind is Kind.FP8:
        raise UnsupportedInputError(f"already {info.dtype.code}", path=path, tensor=info.name,
                                    hint="this checkpoint is already quantized; convert its BF16/FP16/FP32 original")
    if decision.action is Action.QUANTIZE:
        return PlannedTensor(info, decision, dtypes.BY_CODE[options.fp8.safetensors_dtype],
                             scale_shape(info.shape, options.granularity))
    if decision.action is Action.KEEP:
        return PlannedTensor(info, decision, options.keep_dtype.resolve(info.dtype))
    return PlannedTensor(info, decision, info.dtype)


def make_plan(source: SafetensorsFile, options: ConvertOptions) -> Plan:
    """Plan the conversion of one safetensors file under ``options`` (reads the header only)."""
    from .formats import get_format
    fmt = get_format(options.format)
    fmt.check(options)
    tensors = [plan_tensor(info, options, source.path) for info in source.tensors.values()]
    plan = Plan(os.path.basename(source.path), options, tensors)
    plan.outputs = fmt.layout(plan)
    for rule in options.policy.rules:
        matched = [t for t in tensors if rule.matches(t.name)]
        if not matched:
            plan.warnings.append(f"rule --{rule.action.value} {rule.pattern!r} matched no tensor")
        elif rule.action is Action.QUANTIZE and not any(t.decision.kind in QUANTIZABLE for t in matched):
            plan.warnings.append(f"rule --quantize {rule.pattern!r} matched only tensors that cannot be quantized"
                                 " (biases, norms, vectors, non-floats); they stay as they are")
    if not plan.quantized():
        plan.warnings.append("no tensor is quantized: the output only changes precision of kept tensors")
    return plan
