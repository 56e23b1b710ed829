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
    # Fields the user left unset ("granularity", "fp8"): an already-FP8 source supplies them.
    from_source: frozenset = frozenset()
    recipe: Recipe = Recipe.MIXED

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
        return cls(Granularity(granularity or "tensor"), FP8_FORMATS[fp8 or "float8_e4m3fn"], format,
                   KeepDtype(keep_dtype), policy, allow_nonfinite, preset, comfy_header_metadata, component, ema,
                   parse_size(max_shard_size) if max_shard_size is not None else None, unset, recipe)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """A size in bytes, in decimal units as Hugging Face uses them (binary ones with ``i``).

    >>> parse_size("5GB"), parse_size("500MiB")
    (5000000000, 524288000)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) * _UNITS[m.group(2)] < 1:
        raise OptionsError(f"bad size {text!r}", hint="give a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
