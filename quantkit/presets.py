"""Presets: per-architecture policies, detected from a checkpoint's keys and shapes.

A preset contributes rules that run before the user's ``--quantize`` / ``--keep`` rules (so
the user always has the last word) and documents what it keeps in high precision and why.
``auto`` picks the first preset whose ``detect`` accepts the checkpoint and falls back to
``generic`` (the default policy alone) for unknown models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import PolicyError
from .policy import Rule


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    # (what stays in high precision, why): shown by `quantkit presets --show NAME`
    keeps: tuple[tuple[str, str], ...] = ()
    # Where this preset differs from the ecosystem's published FP8 files, and why.
    reference: str = ""
    detect: Callable[[dict], bool] = field(default=lambda infos: False, repr=False)
    rules: Callable[[dict], tuple[Rule, ...]] = field(default=lambda infos: (), repr=False)


GENERIC = Preset(
    name="generic",
    summary="the default policy alone: linears FP8; attention, norms, embeddings, heads, biases kept",
    keeps=(("attention projections", "the default policy is conservative for unknown architectures"),
           ("norms, biases, 1-D vectors", "tiny, and sensitive"),
           ("embeddings, input projections, output heads", "small share of the size, large share of the error")),
)

REGISTRY: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    REGISTRY[preset.name] = preset
    return preset


register(GENERIC)


def resolve(name: str, infos: dict) -> tuple[Preset, str]:
    """The preset for ``name`` ('auto' detects from ``infos``: key -> TensorInfo) and a line saying why."""
    if name == "auto":
        for preset in REGISTRY.values():
            if preset is not GENERIC and preset.detect(infos):
                return preset, f"preset {preset.name} (detected: {preset.summary})"
        return GENERIC, "preset generic (no known architecture detected)"
    if name not in REGISTRY:
        raise PolicyError(f"unknown preset {name!r}", hint=f"known presets: auto, {', '.join(REGISTRY)}")
    return REGISTRY[name], f"preset {name} (chosen)"
