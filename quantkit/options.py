"""Options stage: what the user asked for, as one frozen value, parsed from strings once.

``ConvertOptions`` is built at the edge (the CLI, or a library caller) and read by the plan and
the formats below it. Torch-free, so the CLI can import it for its choices.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from . import dtypes
from .dtypes import E4M3FN, FP8_FORMATS, DType, FP8Format, Granularity
from .errors import OptionsError
from .policy import Action, Policy, Rule


class KeepDtype(enum.Enum):
    """Precision of the floating-point tensors that are not quantized."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    SOURCE = "source"

    def resolve(self, source: DType) -> DType:
        return {KeepDtype.BF16: dtypes.BF16, KeepDtype.FP16: dtypes.F16,
                KeepDtype.FP32: dtypes.F32, KeepDtype.SOURCE: source}[self]


class Recipe(enum.Enum):
    """Which layers a preset's FP8 checkpoint keeps: ``mixed`` keeps attention projections (and,
    as always, norms, embeddings and heads) in high precision and quantizes feed-forward and
    modulation linears, as Stability AI's SD3.5 FP8 release does; ``compact`` quantizes the
    attention too (the published ComfyUI-style FP8 files, about 10% smaller)."""

    MIXED = "mixed"
    COMPACT = "compact"


class Rounding(enum.Enum):
    """How weights become FP8 codes: each to its nearest code, or GPTQ (``quantkit.gptq``: needs the
    layers' input Hessians, gathered by ``calibrate --rounding gptq``)."""

    NEAREST = "nearest"
    GPTQ = "gptq"


class ComputeDtype(enum.Enum):
    """The dtype a model computes in while quantkit runs it (validate --model-output, calibrate)."""

    FP32 = "fp32"
    BF16 = "bf16"


class ActivationRows(enum.Enum):
    """Which rows of simulated FP8 activation quantization validate --model-output adds to the
    weight-only one (``quantkit.model_output``): none; W8A8 as the file implies; all (also scale
    1.0 and dynamic per token)."""

    NONE = "none"
    FILE = "file"
    ALL = "all"


@dataclass(frozen=True)
class ValidateOptions:
    """What ``quantkit.validate`` checks beyond the hashes, as one frozen value.

    ``min_sqnr``: fail any tensor below it (dB; default: the sanity floor). ``check_hash``: compare
    the SHA256s with the manifest. ``component`` / ``ema``: the source's component and EMA choice
    (None: as recorded in the manifest). ``model_output``: also run both models and compare their
    outputs in ``compute_dtype``; ``min_output_sqnr`` fails the weight-only row below it;
    ``activations`` adds simulated W8A8 rows; ``min_w8a8_sqnr`` fails the row "as the file implies"
    below it (and implies ``activations`` FILE at least). ``heldout``: also run both models on the
    held-out set and report per-input figures (``quantkit.heldout``). ``max_memory`` (bytes, or a size such as
    "8GB"): the models run in the runtime's budget mode, as many blocks resident as it holds
    (default: streamed, one block at a time). Strings are accepted for the enums.

    >>> ValidateOptions(activations="all", compute_dtype="bf16").activations
    <ActivationRows.ALL: 'all'>
    """

    min_sqnr: float | None = None
    check_hash: bool = True
    component: str | None = None
    ema: bool | None = None
    model_output: bool = False
    min_output_sqnr: float | None = None
    compute_dtype: ComputeDtype = ComputeDtype.FP32
    activations: ActivationRows = ActivationRows.FILE
    min_w8a8_sqnr: float | None = None
    max_memory: int | None = None
    heldout: bool = False          # also the per-input figures on the held-out set (quantkit.heldout)

    def __post_init__(self):
        if isinstance(self.max_memory, str):
            object.__setattr__(self, "max_memory", parse_size(self.max_memory))
        object.__setattr__(self, "compute_dtype", _member(ComputeDtype, self.compute_dtype, "compute_dtype"))
        activations = _member(ActivationRows, self.activations, "activations")
        if self.min_w8a8_sqnr is not None and activations is ActivationRows.NONE:
            activations = ActivationRows.FILE        # a bar on the W8A8 row needs that row
        object.__setattr__(self, "activations", activations)

    @property
    def runs_model(self) -> bool:
        """Whether the models run (given a source): asked for, or implied by an output bar."""
        return (self.model_output or self.min_output_sqnr is not None or self.min_w8a8_sqnr is not None
                or self.heldout)


def _member(enum_type: type[enum.Enum], value, what: str):
    """``value`` as a member of ``enum_type`` (a member or its string), or a ValueError naming the choices."""
    try:
        return enum_type(value)
    except ValueError:
        raise ValueError(f"{what} {value!r}: use one of {', '.join(m.value for m in enum_type)}") from None


@dataclass(frozen=True)
class ConvertOptions:
    """What ``convert`` (and plan, calibrate, sensitivity) does to each tensor: build it with
    ``from_strings`` at the edge, or by keyword. ``from_source``: the fields the user left unset
    (``"granularity"``, ``"fp8"``), which an already-FP8 source supplies."""

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
    # Fields the user left unset ("granularity", "fp8"): an already-FP8 source supplies them.
    from_source: frozenset = frozenset()
    recipe: Recipe = Recipe.MIXED
    rounding: Rounding = Rounding.NEAREST   # gptq: needs stats with Hessians (calibrate --rounding gptq)

    @classmethod
    def from_strings(cls, *, granularity: str | None = "tensor", fp8: str | None = "float8_e4m3fn",
                     format: str = "native",
                     keep_dtype: str = "bf16", rules: list[tuple[str, str]] = (), quantize_conv: bool = False,
                     allow_nonfinite: bool = False, preset: str = "auto", comfy_header_metadata: bool = False,
                     component: str | None = None, ema: bool = False,
                     max_shard_size: str | None = None, recipe: str = "mixed") -> "ConvertOptions":
        """Build options from CLI-style strings; ``rules`` are ``("quantize"|"keep", pattern)`` in order.
        ``granularity`` / ``fp8`` None: per tensor / E4M3, or what an already-FP8 source holds."""
        if fp8 is not None and fp8 not in FP8_FORMATS:
            raise OptionsError(f"unknown FP8 dtype {fp8!r}", hint=f"choose one of {', '.join(FP8_FORMATS)}")
        if component is not None and not component.strip():
            raise OptionsError("--component is empty", hint="name a component (transformer, unet, vae, ...) or leave "
                                                             "the option out")
        recipe = Recipe(recipe)
        policy = Policy(tuple(Rule(Action(a), p) for a, p in rules), quantize_conv=quantize_conv)
        unset = frozenset(k for k, v in (("granularity", granularity), ("fp8", fp8)) if v is None)
        return cls(granularity=Granularity(granularity or "tensor"), fp8=FP8_FORMATS[fp8 or "float8_e4m3fn"],
                   format=format, keep_dtype=KeepDtype(keep_dtype), policy=policy, allow_nonfinite=allow_nonfinite,
                   preset=preset, comfy_header_metadata=comfy_header_metadata, component=component, ema=ema,
                   max_shard_bytes=parse_size(max_shard_size, "--max-shard-size") if max_shard_size is not None
                   else None,
                   from_source=unset, recipe=recipe)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, option: str | None = None) -> int:
    """A size in bytes, in decimal units as Hugging Face uses them (binary ones with ``i``);
    ``option``, the option it was given to, is named in the error.

    >>> parse_size("5GB"), parse_size("500MiB")
    (5000000000, 524288000)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) * _UNITS[m.group(2)] < 1:
        raise OptionsError(f"{option + ': ' if option else ''}bad size {text!r}",
                           hint="give a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
