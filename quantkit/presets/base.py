"""What every preset shares: the ``Preset`` record, the registry, detection by signatures and
rules anchored at the roots where an architecture was found, and ``resolve``.

The preset families (``diffusion``, ``encoders``) build theirs with ``_preset`` and register them on
import; ``quantkit.presets`` imports them in order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import PolicyError
from ..policy import Action, Rule

Q, K = Action.QUANTIZE, Action.KEEP
# Quantize in every recipe: attention that another naming of the same model fuses with the MLP in
# one tensor (FLUX's single blocks: BFL's linear1 = q, k, v and the MLP input), so that both namings
# of one model get the same decisions.
Q_EVERY_RECIPE = "quantize in every recipe"


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
    # (what becomes FP8 beyond the default policy's linears, why); for docs and `presets --show`.
    quantizes: tuple[tuple[str, str], ...] = ()
    # How `auto` recognises the architecture (documentation).
    detection: str = ""
    # The key prefixes under which the architecture was found ('' = unprefixed); empty if absent.
    locate: Callable[[dict], tuple[str, ...]] = field(default=lambda infos: (), repr=False)
    # The attention projections it recognises (kept by --recipe mixed, FP8 with --recipe compact).
    attention: str = ""
    # The variant the keys tell ("Wan 2.2 14B i2v", "LTX-2 (audio-video)"); '' where they tell none.
    variant: Callable[[dict], str] = field(default=lambda infos: "", repr=False)


def _router_rules(infos: dict) -> tuple[Rule, ...]:
    """Keep every MoE router: a 2-D ``<moe>.gate.weight`` whose ``<moe>.experts.*`` exist.

    A router is a small matrix whose error changes which experts run, and some loaders hold it as a
    bare parameter, not a Linear (ComfyUI's HiDream ``MoEGate``), so an FP8 router breaks the model.
    """
    parents = set()
    for key in infos:
        segments = key.split(".")
        parents.update(".".join(segments[:i]) for i, s in enumerate(segments) if s == "experts")
    return tuple(Rule(Action.KEEP, "re:" + re.escape(key[:-len(".weight")]))
                 for key, info in infos.items()
                 if key.endswith(".gate.weight") and len(info.shape) == 2
                 and key[:-len(".gate.weight")] in parents)


GENERIC = Preset(
    name="generic",
    summary="the default policy alone: linears FP8; attention, norms, embeddings, heads, biases kept",
    keeps=(("attention projections", "the default policy is conservative for unknown architectures"),
           ("norms, biases, 1-D vectors", "tiny, and sensitive"),
           ("embeddings, input projections, output heads", "small share of the size, large share of the error"),
           ("MoE routers (<moe>.gate beside <moe>.experts.*)", "small; their error changes which experts run, "
            "and ComfyUI loads some (HiDream's MoEGate) as a bare parameter that cannot hold an FP8 weight")),
    detection="fallback of 'auto' when no other preset recognises the checkpoint",
    attention="every projection the policy recognises as attention (to_q/k/v, q_proj, query ..., and layers "
              "inside an attn/attention module): kept by the default policy in both recipes",
    rules=_router_rules,
)

REGISTRY: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    """Add a preset to the table under its name; a second preset of the same name is an error."""
    if preset.name in REGISTRY and REGISTRY[preset.name] is not preset:
        raise ValueError(f"preset {preset.name!r} is registered twice")
    REGISTRY[preset.name] = preset
    return preset


register(GENERIC)


# ----------------------------------------------------------------------------- detection and rules

# Shape predicates (shapes are tuples; h is a hidden size read off the anchor).
def _mat(shape, rows=None, cols=None) -> bool:
    return len(shape) == 2 and (rows is None or shape[0] == rows) and (cols is None or shape[1] == cols)


@dataclass(frozen=True)
class _Signature:
    """One way to recognise an architecture under a root, and the rules for that naming.

    ``anchor`` is a regex for the key after the root, its block index captured as ``(?P<i>...)``;
    ``siblings`` are keys after the root (``{i}`` = the anchor's index) that must exist as well;
    ``fits(anchor_shape, *sibling_shapes)`` checks that their shapes belong together.
    ``rules`` are ``(action, pattern)`` with patterns relative to the root: a glob, or ``re:``
    followed by a regex; a leading ``../`` makes a pattern relative to the root's parent (heads
    such as ``lm_head`` sit beside ``model.``, not under it).
    """

    anchor: str
    siblings: tuple[str, ...] = ()
    fits: Callable[..., bool] = lambda *shapes: True
    rules: tuple[tuple[Action, str], ...] = ()


@dataclass(frozen=True)
class _Architecture:
    signatures: tuple[_Signature, ...]
    # Regexes (after the root) that must match no key under the root: another architecture's markers.
    absent: tuple[str, ...] = ()

    def find(self, infos: dict, loose: bool = False) -> list[tuple[str, _Signature]]:
        """(root, signature) for every root where a signature holds; ``loose`` skips the shape checks."""
        found: dict[str, _Signature] = {}
        rejected: set[str] = set()
        for sig in self.signatures:
            rx = re.compile(r"(?P<root>(?:.*\.)?)" + sig.anchor)
            head, tail = _literals(sig.anchor)
            for key, info in infos.items():
                m = rx.fullmatch(key) if key.endswith(tail) and head in key else None
                if m is None or m["root"] in found or m["root"] in rejected:
                    continue
                root, i = m["root"], m.groupdict().get("i")
                siblings = [infos.get(root + s.format(i=i)) for s in sig.siblings]
                if any(s is None for s in siblings):
                    continue
                if not loose and not sig.fits(tuple(info.shape), *(tuple(s.shape) for s in siblings)):
                    continue
                if self._marked(infos, root):
                    rejected.add(root)
                    continue
                found[root] = sig
        return list(found.items())

    def _marked(self, infos: dict, root: str) -> bool:
        if not self.absent:
            return False
        rx = re.compile(re.escape(root) + "(?:" + "|".join(self.absent) + ")")
        return any(rx.fullmatch(k) for k in infos)

    def rules(self, infos: dict) -> tuple[Rule, ...]:
        where = self.find(infos) or self.find(infos, loose=True)
        if not where:   # chosen by name, nothing recognised: the rules of every naming, unprefixed
            where = [("", sig) for sig in self.signatures]
        out: list[Rule] = []
        for root, sig in where:
            out.extend(_rule(action, root, pattern) for action, pattern in sig.rules)
        return tuple(dict.fromkeys(out))


def _literals(anchor: str) -> tuple[str, str]:
    """The plain text an anchor starts and ends with (``double_blocks.``, ``.img_attn.qkv.weight``): a pre-filter."""
    def plain(text):
        return re.sub(r"\\(.)", r"\1", text)
    return plain(re.split(r"[(\[+*?]", anchor)[0]), plain(re.split(r"[)\]+*?]", anchor)[-1])


def _rule(action, root: str, pattern: str) -> Rule:
    """A Rule for ``pattern`` (glob or 're:' regex, relative to ``root``) anchored at ``root``;
    ``action`` an Action or ``Q_EVERY_RECIPE``."""
    every_recipe = action == Q_EVERY_RECIPE
    action = Action.QUANTIZE if every_recipe else action
    if pattern.startswith("../"):
        pattern = pattern[3:]
        root = root[:-1].rpartition(".")[0] + "." if root.count(".") > 1 else ""
    if pattern.startswith("re:"):
        return Rule(action, "re:" + re.escape(root) + pattern[3:], every_recipe=every_recipe)
    return Rule(action, re.sub(r"([*?\[])", r"[\1]", root) + pattern, every_recipe=every_recipe)


_ARCHITECTURES: dict[str, _Architecture] = {}


# Presets whose rules also apply to their part of an all-in-one checkpoint (text encoders), in
# the order they registered.
BUNDLED: list[Preset] = []
# Presets whose model holds encoder-like stacks of its own (ACE-Step 1.5's Qwen3-like lyric encoder):
# an encoder found under one of their roots is part of the model, not a bundled encoder.
_OWNS_NESTED: set[str] = set()


def _preset(name: str, summary: str, arch: _Architecture, *, detection: str, quantizes, keeps,
            reference: str, attention: str = "", bundled: bool = False,
            variant: Callable[[dict, str], str] | None = None, owns_nested: bool = False) -> Preset:
    """Register the preset of an architecture; ``bundled``: its rules also apply where it sits
    beside another recognised model in one checkpoint (a text encoder in an all-in-one file);
    ``variant(infos, root)`` names the variant found at the first root (or ''); ``owns_nested``: an
    encoder found under one of its roots belongs to it (see ``_OWNS_NESTED``)."""
    _ARCHITECTURES[name] = arch
    if owns_nested:
        _OWNS_NESTED.add(name)

    def locate(infos):
        return tuple(root for root, _ in arch.find(infos))

    def rules(infos):
        own_roots = set(locate(infos))   # encoders are "bundled" only beside a recognised model
        return arch.rules(infos) + (_bundled_rules(name, infos, own_roots) if own_roots else ())

    def named(infos):
        roots = locate(infos) if variant else ()
        return variant(infos, roots[0]) if roots else ""

    preset = register(Preset(name=name, summary=summary, keeps=tuple(keeps), reference=reference,
                             quantizes=tuple(quantizes),
                             detect=lambda infos: bool(locate(infos)), rules=rules, detection=detection,
                             locate=locate, attention=attention, variant=named))
    if bundled:
        BUNDLED.append(preset)
    return preset


def _bundled(name: str, infos: dict, exclude_roots=()) -> list[tuple[Preset, str]]:
    """Encoders found in the checkpoint besides preset ``name``'s own roots: (preset, root)."""
    def excluded(root):
        return root in exclude_roots or (name in _OWNS_NESTED and any(root.startswith(r) for r in exclude_roots))
    return [(p, root) for p in BUNDLED if p.name != name for root in p.locate(infos) if not excluded(root)]


def _bundled_rules(name: str, infos: dict, own_roots: set[str]) -> tuple[Rule, ...]:
    out: list[Rule] = []
    for p, root in _bundled(name, infos, own_roots):
        arch = _ARCHITECTURES[p.name]
        sig = dict(arch.find(infos))[root]
        out.extend(_rule(action, root, pattern) for action, pattern in sig.rules)
    return tuple(out)


def resolve(name: str, infos: dict) -> tuple[Preset, str]:
    """The preset for ``name`` ('auto' detects from ``infos``: key -> TensorInfo) and a line saying why."""
    if name == "auto":
        for preset in REGISTRY.values():
            if preset is not GENERIC and preset.detect(infos):
                return preset, (f"preset {preset.name} (detected{_variant(preset, infos)}{_where(preset, infos)}: "
                                f"{preset.summary})")
        return GENERIC, "preset generic (no known architecture detected)"
    if name not in REGISTRY:
        raise PolicyError(f"unknown preset {name!r}", hint=f"known presets: auto, {', '.join(REGISTRY)}")
    preset = REGISTRY[name]
    if preset is GENERIC or preset.detect(infos):
        return preset, f"preset {name} (chosen{_variant(preset, infos)}{_where(preset, infos)})"
    return preset, (f"preset {name} (chosen; its architecture was not recognised in this checkpoint, "
                    "so its rules may match nothing)")


def _variant(preset: Preset, infos: dict) -> str:
    name = preset.variant(infos)
    return f" {name}" if name else ""


def _where(preset: Preset, infos: dict) -> str:
    roots = preset.locate(infos)
    text = f" at {', '.join(repr(r) for r in roots)}" if any(roots) else ""
    extra = _bundled(preset.name, infos, set(roots)) if roots else []
    if extra:
        text += "; bundled encoders: " + ", ".join(f"{p.name} at {root!r}" for p, root in extra)
    return text


# ----------------------------------------------------------------------------- shared reasons
# Sources behind these sentences: docs/presets.md. The reasons only diffusion presets give are in diffusion.py.

_WHY_NORMS = "1-D and tiny; no FP8 tool quantizes them (and the policy cannot)"
