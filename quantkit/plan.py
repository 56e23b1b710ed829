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
from .formats import StoredTensor
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
    preset: str = "auto"
    comfy_header_metadata: bool = False     # format comfy: also write _quantization_metadata
    component: str | None = None            # diffusers pipeline folder: the component to convert
    ema: bool = False                       # convert the EMA copy of the weights
    max_shard_bytes: int | None = None      # sharded output: at most this many bytes per shard

    @classmethod
    def from_strings(cls, *, granularity: str = "tensor", fp8: str = "float8_e4m3fn", format: str = "native",
                     keep_dtype: str = "bf16", rules: list[tuple[str, str]] = (), quantize_conv: bool = False,
                     allow_nonfinite: bool = False, preset: str = "auto", comfy_header_metadata: bool = False,
                     component: str | None = None, ema: bool = False,
                     max_shard_size: str | None = None) -> "ConvertOptions":
        """Build options from CLI-style strings; ``rules`` are ``("quantize"|"keep", pattern)`` in order."""
        from .fp8 import FP8_FORMATS
        if fp8 not in FP8_FORMATS:
            raise PolicyError(f"unknown FP8 dtype {fp8!r}", hint=f"choose one of {', '.join(FP8_FORMATS)}")
        policy = Policy(tuple(Rule(Action(a), p) for a, p in rules), quantize_conv=quantize_conv)
        return cls(Granularity(granularity), FP8_FORMATS[fp8], format, KeepDtype(keep_dtype), policy, allow_nonfinite,
                   preset, comfy_header_metadata, component, ema,
                   parse_size(max_shard_size) if max_shard_size is not None else None)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``5GB`` -> 5_000_000_000, ``500MiB`` -> 524_288_000 (decimal units as Hugging Face uses them)."""
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) * _UNITS[m.group(2)] < 1:
        raise PolicyError(f"bad size {text!r}", hint="give a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class PlannedTensor:
    info: TensorInfo
    decision: Decision
    out_dtype: DType                  # dtype of the tensor under its own key in the output
    scale_shape: tuple[int, ...] | None = None
    prequantized: StoredTensor | None = None   # already FP8 in the source: bytes and scale carried over

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
    notes: list[str] = field(default_factory=list)     # what was detected and chosen
    policy: Policy | None = None                       # the effective policy (preset + user rules)
    source_format: str | None = None                   # set when the source is already quantized

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
            "policy": (self.policy or self.options.policy).describe(),
            "notes": self.notes,
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


def plan_tensor(info: TensorInfo, options: ConvertOptions, policy: Policy, path: str) -> PlannedTensor:
    decision = policy.decide(info.name, info.shape, info.dtype)
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
    from .presets import resolve
    fmt = get_format(options.format)
    fmt.check(options)
    fmt.check_source(source)
    preset, why = resolve(options.preset, source.tensors)
    policy = options.policy.with_preset(preset.name, preset.rules(source.tensors))
    plan = Plan(os.path.basename(os.path.normpath(source.path)), options, [],
                notes=[*getattr(source, "notes", []), why], policy=policy)
    stored = _already_quantized(source, options, plan)
    for info in source.tensors.values():
        if stored is None:
            plan.tensors.append(plan_tensor(info, options, policy, source.path))
        elif info.name in stored:
            s = stored[info.name]
            if s.scale_key is None:
                plan.tensors.append(plan_tensor(info, options, policy, source.path))
            else:
                decision = Decision(Action.QUANTIZE, policy.decide(info.name, info.shape, dtypes.F32).kind,
                                    f"already FP8 ({plan.source_format}): codes and scale carried over")
                plan.tensors.append(PlannedTensor(info, decision, info.dtype,
                                                  scale_shape(info.shape, s.granularity), s))
    plan.outputs = fmt.layout(plan)
    for rule in options.policy.rules:
        matched = [t for t in plan.tensors if rule.matches(t.name)]
        if not matched:
            plan.warnings.append(f"rule --{rule.action.value} {rule.pattern!r} matched no tensor")
        elif rule.action is Action.QUANTIZE and not any(t.decision.kind in QUANTIZABLE for t in matched):
            plan.warnings.append(f"rule --quantize {rule.pattern!r} matched only tensors that cannot be quantized"
                                 " (biases, norms, vectors, non-floats); they stay as they are")
    if not plan.quantized():
        plan.warnings.append("no tensor is quantized: the output only changes precision of kept tensors")
    plan.warnings.extend(fmt.warnings(plan))
    return plan


def _already_quantized(source: SafetensorsFile, options: ConvertOptions, plan: Plan):
    """For a source that is already an FP8 checkpoint of a known convention: how it is stored.

    Its FP8 codes and scales are carried over unchanged (conversion between conventions, no
    re-quantization), so granularity and FP8 dtype must match what it holds.
    """
    if not any(i.dtype.kind is Kind.FP8 for i in source.tensors.values()):
        return None
    from .formats import detect_format
    try:
        fmt = detect_format(source)
    except (UnsupportedInputError, ValueError):
        fmt = None
    if fmt is None:
        first = next(i for i in source.tensors.values() if i.dtype.kind is Kind.FP8)
        raise UnsupportedInputError(f"already {first.dtype.code}, without scales of a convention quantkit knows",
                                    path=source.path, tensor=first.name,
                                    hint="convert its BF16/FP16/FP32 original instead")
    try:
        stored = fmt.stored(source)
    except ValueError as exc:
        raise UnsupportedInputError(f"looks like a {fmt.name} checkpoint but does not follow it: {exc}",
                                    path=source.path, hint="convert its BF16/FP16/FP32 original instead") from None
    plan.source_format = fmt.name
    plan.notes.append(f"source is already quantized ({fmt.name}): FP8 codes and scales are carried over")
    for s in stored.values():
        if s.scale_key is None:
            continue
        if s.granularity is not options.granularity or s.fp8 is not options.fp8:
            raise UnsupportedInputError(
                f"already quantized as {s.fp8.name} with {s.granularity.value} scales; re-quantizing is not supported",
                path=source.path, tensor=s.source_key,
                hint=f"pass --granularity {s.granularity.value} --fp8-dtype {s.fp8.name}, or convert the original")
    return stored
