"""Policy: which tensors become FP8 and which stay in high precision, and why.

A tensor is first *classified* by what it is (dtype, rank, whether it is a layer's weight,
where it sits in the module tree), then the default action for its kind applies, then the
user's rules, in order: the last rule that matches wins.

Names alone mislead: diffusers' ``attentions.N`` containers also hold feed-forward layers, and
the AdaLN modulation layers of FLUX/SD3 are large linears named ``norm1.linear``. So
normalization is recognised by rank (its weights are 1-D), attention by the projection's own
module or its attention-module parent, never by a substring anywhere in the key.
"""
from __future__ import annotations

import enum
import fnmatch
import json
import re
from dataclasses import dataclass, field

from .dtypes import DType, Kind
from .errors import PolicyError


class Action(enum.Enum):
    QUANTIZE = "quantize"   # FP8 with a scale
    KEEP = "keep"           # stays floating point, written in the keep dtype
    PASS = "pass"           # non-float (ints, bools): written byte for byte


class TensorKind(enum.Enum):
    LINEAR = "linear"
    ATTENTION = "attention projection"
    CONV = "convolution"
    EMBEDDING = "embedding"
    HEAD = "output head"
    NORM = "normalization"
    BIAS = "bias"
    VECTOR = "1-D parameter"
    PARAM = "non-layer parameter"
    NONFLOAT = "non-float"
    FP8 = "already fp8"


# An attention module: attn, attn1, attn2, self_attn, img_attn, cross_attn, attention,
# SelfAttention, EncDecAttention ... but not diffusers' plural "attentions" container.
_ATTENTION_MODULE = re.compile(r"(?i)^(.*attn\d*|.*attention)$")
# A projection that is attention wherever it sits (e.g. the VAE's mid-block attention,
# whose parent is the plural container).
_ATTENTION_PROJECTIONS = frozenset({
    "to_q", "to_k", "to_v", "to_qkv", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value",
})
_EMBEDDING = re.compile(r"(?i)^(.*embed.*|wte|wpe|shared)$")
_HEAD = frozenset({"lm_head", "classifier", "score"})
_NORM = re.compile(r"(?i)(norm|^ln(_\w+)?$|^ln\d*$|layernorm|rms)")

DEFAULT_ACTIONS = {
    TensorKind.LINEAR: Action.QUANTIZE,
    TensorKind.CONV: Action.KEEP,
}
# Kinds a --quantize rule may turn into FP8: weights of layers with a matrix (>= 2-D).
QUANTIZABLE = frozenset({TensorKind.LINEAR, TensorKind.ATTENTION, TensorKind.CONV,
                         TensorKind.EMBEDDING, TensorKind.HEAD})


def _module_path(name: str) -> list[str]:
    """Module segments of a parameter key, numeric list indices dropped ('to_out.0.weight' -> [... 'to_out'])."""
    return [s for s in name.split(".")[:-1] if not s.isdigit()]


def classify(name: str, shape: tuple[int, ...], dtype: DType) -> TensorKind:
    """What a tensor is, from its dtype, rank and place in the module tree."""
    if dtype.kind is Kind.FP8:
        return TensorKind.FP8
    if dtype.kind is not Kind.FLOAT:
        return TensorKind.NONFLOAT
    leaf = name.rsplit(".", 1)[-1]
    modules = _module_path(name)
    if leaf == "bias":
        return TensorKind.BIAS
    if len(shape) <= 1:
        return TensorKind.NORM if any(_NORM.search(m) for m in modules[-2:]) else TensorKind.VECTOR
    if leaf != "weight":
        return TensorKind.PARAM
    own = modules[-1] if modules else ""
    if any(_EMBEDDING.match(m) for m in modules):
        return TensorKind.EMBEDDING
    if own in _HEAD:
        return TensorKind.HEAD
    if len(shape) >= 3:
        return TensorKind.CONV
    if own in _ATTENTION_PROJECTIONS or any(_ATTENTION_MODULE.match(m) for m in modules[:-1]):
        return TensorKind.ATTENTION
    return TensorKind.LINEAR


@dataclass(frozen=True)
class Rule:
    """``action`` for every tensor whose key or layer name matches ``pattern``.

    A pattern is a glob (``*`` also crosses dots) matched against the whole key
    (``blocks.0.attn.qkv.weight``) or the layer name (``blocks.0.attn.qkv``); with a ``re:``
    prefix it is a regular expression that must match one of them in full.
    """

    action: Action
    pattern: str

    def __post_init__(self):
        if self.action is Action.PASS:
            raise PolicyError("a rule can only quantize or keep")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as exc:
                raise PolicyError(f"bad regular expression {self.pattern!r}: {exc}",
                                  hint="patterns with re: are Python regular expressions") from None
        elif not self.pattern:
            raise PolicyError("empty pattern", hint="give a glob such as '*.attn.*' or 're:...'")

    def matches(self, name: str) -> bool:
        layer = name.rsplit(".", 1)[0]
        if self.pattern.startswith("re:"):
            rx = re.compile(self.pattern[3:])
            return bool(rx.fullmatch(name) or rx.fullmatch(layer))
        return fnmatch.fnmatchcase(name, self.pattern) or fnmatch.fnmatchcase(layer, self.pattern)


@dataclass(frozen=True)
class Decision:
    action: Action
    kind: TensorKind
    reason: str
    rule: Rule | None = None


@dataclass(frozen=True)
class Policy:
    """The default policy plus the user's rules (the last matching rule wins)."""

    rules: tuple[Rule, ...] = ()
    quantize_conv: bool = False
    name: str = "default"

    def decide(self, name: str, shape: tuple[int, ...], dtype: DType) -> Decision:
        kind = classify(name, shape, dtype)
        if kind is TensorKind.NONFLOAT:
            return Decision(Action.PASS, kind, "non-float tensor, copied untouched")
        if kind is TensorKind.FP8:
            return Decision(Action.PASS, kind, "already FP8")
        action = DEFAULT_ACTIONS.get(kind, Action.KEEP)
        if kind is TensorKind.CONV and self.quantize_conv:
            action = Action.QUANTIZE
        decision = Decision(action, kind, f"{kind.value}: default {action.value}")
        for rule in self.rules:
            if not rule.matches(name):
                continue
            if rule.action is Action.QUANTIZE and kind not in QUANTIZABLE:
                decision = Decision(Action.KEEP, kind, f"{kind.value}: cannot quantize, rule {rule.pattern!r} ignored", rule)
            else:
                decision = Decision(rule.action, kind, f"{kind.value}: rule --{rule.action.value} {rule.pattern!r}", rule)
        return decision

    def describe(self) -> dict:
        """A JSON-able description, recorded in output metadata."""
        return {
            "name": self.name,
            "defaults": {"linear": "quantize", "convolution": "quantize" if self.quantize_conv else "keep",
                         "other floating point": "keep", "non-float": "pass"},
            "rules": [[r.action.value, r.pattern] for r in self.rules],
        }

    def to_json(self) -> str:
        return json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))

    def unused_rules(self, names) -> list[Rule]:
        """Rules that matched no tensor (usually a typo worth telling the user about)."""
        return [r for r in self.rules if not any(r.matches(n) for n in names)]
