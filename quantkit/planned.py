"""The plan as data: every source tensor's fate (``PlannedTensor``), every output tensor
(``Emit``), and how a format stores a source tensor (``StoredTensor``).

``plan.make_plan`` fills a ``Plan``; the formats below it turn it into output tensors and read
their files back into ``StoredTensor``s; the quantizer and the reports read it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .dtypes import E4M3FN, DType, FP8Format, Granularity
from .options import ConvertOptions
from .policy import Action, Decision, Policy
from .reader import TensorInfo
from .writer import OutputTensor


class Role(enum.Enum):
    DATA = "data"          # the source tensor's values: FP8 codes, a cast, or the bytes as they are
    SCALE = "scale"        # the dequantization scale of a quantized tensor (W = q * scale)
    CONSTANT = "constant"  # bytes fixed by the format (markers, per-layer JSON)


@dataclass(frozen=True)
class Emit:
    """One output tensor and where its bytes come from."""

    spec: OutputTensor
    role: Role
    source: str | None = None     # the source tensor it belongs to (None for file-level constants)
    payload: bytes = b""          # CONSTANT only


@dataclass(frozen=True)
class StoredTensor:
    """How a source tensor is stored in an output file, as a format reads it back."""

    source_key: str
    data_key: str
    scale_key: str | None = None          # None: stored in high precision (or passed through)
    granularity: Granularity | None = None
    fp8: FP8Format | None = None
    input_scale_key: str | None = None    # a static activation scale (F32, one value) beside it, if any

    @property
    def input_fp8(self) -> FP8Format:
        """The FP8 dtype a client quantizes the layer's input to for an FP8 matmul: E4M3."""
        return E4M3FN


@dataclass(frozen=True)
class PlannedTensor:
    info: TensorInfo
    decision: Decision
    out_dtype: DType                  # dtype of the tensor under its own key in the output
    scale_shape: tuple[int, ...] | None = None
    prequantized: StoredTensor | None = None   # already FP8 in the source: bytes and scale carried over
    # Calibrated range (absmax as the stats' observer saw it) of the layer's input, from a stats
    # file: a format with a place for static activation scales writes range / its FP8 max.
    input_range: float | None = None

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
    outputs: list[Emit] = field(default_factory=list)   # in file order
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # what was detected and chosen
    policy: Policy | None = None                       # the effective policy (preset + user rules)
    source_format: str | None = None                   # set when the source is already quantized
    # From a stats file (``convert --stats``): what the stats are (``stats_record``), and the weight
    # ranges of quantized tensors under the plan's names (scale-shaped float32; W scale = range / FP8 max).
    stats: dict | None = None
    weight_ranges: dict = field(default_factory=dict)
    # The layers kept for a size-for-quality target (``sensitivity.KeepChoice.to_dict``): the manifest's record.
    keep_choice: dict | None = None

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

    def summary(self) -> dict:
        """What was decided, in one place: the output's header metadata, its manifest, ``--json``
        reports and ``ConvertResult`` are all rendered from this."""
        o = self.options
        return {"format": o.format, "recipe": o.recipe.value, "fp8": o.fp8.name, "granularity": o.granularity.value,
                "keep_dtype": o.keep_dtype.value, "policy": (self.policy or o.policy).describe(),
                "notes": self.notes, "counts": {a.value: self.count(a) for a in Action},
                **({"stats": self.stats} if self.stats is not None else {})}

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            **self.summary(),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "warnings": self.warnings,
            **({"keep_choice": self.keep_choice} if self.keep_choice is not None else {}),
            "tensors": [{"name": t.name, "shape": list(t.info.shape), "dtype": t.info.dtype.code,
                         "action": t.action.value, "kind": t.decision.kind.value, "reason": t.decision.reason,
                         "out_dtype": t.out_dtype.code,
                         "scale_shape": list(t.scale_shape) if t.scale_shape is not None else None,
                         **({"input_range": t.input_range} if t.input_range is not None else {})}
                        for t in self.tensors],
        }
