"""Policy: which tensors become FP8 and which stay in high precision, and why.

A tensor is first *classified* by what it is (dtype, rank, whether it is a layer's weight,
where it sits in the module tree), then the default action for its kind applies, then the
user's rules, in order: the last rule that matches wins.

Names alone mislead: diffusers' ``attentions.N`` containers also hold feed-forward layers, and
the AdaLN modulation layers of FLUX/SD3 are large linears named ``norm1.linear``. So
normalization is recognised by rank (its weights are 1-D), attention by the projection's own
module or its attention-module parent, never by a substring anywhere in the key. Every name
pattern below is matched against ONE module segment of the key (``a.b.c.weight`` -> ``a``,
``b``, ``c``; numeric list indices are structure, not names).

Classification, first match wins:

1. dtype: FP8 -> ``FP8`` (pass), any other non-float (ints, bools) -> ``NONFLOAT`` (pass).
2. leaf ``bias`` -> ``BIAS``; rank <= 1 -> ``NORM`` when the layer or its parent is a norm
   (``norm*``, ``*_norm``, ``ln_f``, ``LayerNorm``, ``*rms*``), else ``VECTOR``.
3. a tensor of rank >= 2 whose leaf is not ``weight`` (``pos_embed``, ``scale_shift_table``,
   ``in_proj_weight``) -> ``PARAM``.
4. ``EMBEDDING``: the layer sits in an embedder module, one whose segment contains ``embed``
   or ends in ``_emb`` (``x_embedder``, ``context_embedder``, ``time_text_embed``,
   ``pos_embed.proj``, ``embed_tokens``, ``token_embedding``, LDM ``time_embed``/``label_emb``),
   or is ``wte``/``wpe``/``shared``/``relative_attention_bias`` -- *unless* a stack of blocks
   lies between the embedder and the layer (a numeric index followed by at least two module
   names, as in HunyuanVideo's ``context_embedder.token_refiner.refiner_blocks.0.attn.to_q`` or
   SDXL's ``conditioner.embedders.0.transformer...``): those are ordinary transformer layers.
5. ``EMBEDDING`` (input projection): a 2-D weight of a module named ``<word>_in``, or of a child
   of one, that is not inside a numbered block -- no numeric segment anywhere before it. This is
   the documented rule that keeps the BFL/ComfyUI FLUX ``img_in``, ``txt_in``,
   ``time_in.in_layer``, ``vector_in.in_layer``, ``guidance_in.in_layer`` and QwenImage's
   ``img_in``/``txt_in`` in high precision exactly like their diffusers twins ``x_embedder``,
   ``context_embedder`` and ``time_text_embed.*``; a block-internal ``proj_in`` (UNet
   ``attentions.N.proj_in``) or ``ff.linear_in`` has an index before it and stays ``LINEAR``.
   Output projections (``proj_out``, BFL ``final_layer.linear``) are ordinary ``LINEAR``.
6. ``HEAD``: the layer or its parent is ``lm_head``, ``classifier``, ``score``, ``pooler``,
   ``text_projection`` or ``visual_projection`` (a model's output projection).
7. rank >= 3 -> ``CONV`` (conv weights; GPT-2's ``Conv1D`` is 2-D and is a linear).
8. ``LINEAR`` when the layer's own name says it is (mostly) a feed-forward projection
   (an ``mlp``/``ff``/``ffn`` token: FLUX.2's fused ``attn.to_qkv_mlp_proj``, like BFL's
   ``single_blocks.N.linear1`` which fuses qkv and the MLP input).
9. ``LINEAR`` when the layer's own name says it is a modulation (``adaln_modulation_self_attn``,
   Cosmos Predict2's AdaLN-LoRA for its attention: a modulation, whatever the ``attn`` token says).
10. ``ATTENTION``: the layer is a known attention projection (``to_q``, ``to_out``, ``q_proj``,
   ``query``, a bare ``q``/``k``/``v`` as CogVideoX names them ...), its own name has an
   ``attn``/``attention`` token (HunyuanVideo's ``img_attn_qkv``, ``img_attn_proj``), or it sits
   in an attention module (a segment ending in ``attn``/``attnN``/``attn_N``/``attention``:
   ``attn1``, ``self_attn``, ``img_attn``, ``SelfAttention``, BERT's ``attention.output.dense``)
   with no stack of blocks in between;
   diffusers' plural ``attentions`` container is not an attention module.
11. everything else 2-D -> ``LINEAR`` (feed-forward, AdaLN modulation ``norm1.linear``,
    ``img_mod.lin``, ``time_emb_proj``, UNet ``proj_in``/``proj_out``, ``proj_out``).

Defaults: ``LINEAR`` -> quantize; ``CONV`` -> keep (quantize with ``quantize_conv=True``);
everything else float -> keep; non-float and FP8 -> pass. A ``--quantize`` rule may only
turn layer weights with a matrix (``QUANTIZABLE``) into FP8; on biases, 1-D tensors and
non-layer parameters it is refused and the tensor stays KEEP, with the reason recorded.
"""
from __future__ import annotations

import enum
import fnmatch
import json
import re
import shlex
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


# An attention module: attn, attn1, attn_1, self_attn, img_attn, cross_attn, attention,
# SelfAttention, EncDecAttention ... but not diffusers' plural "attentions" container.
_ATTENTION_MODULE = re.compile(r"(?i)^(.*attn_?\d*|.*attention)$")
# A layer whose own name has an attention token: HunyuanVideo's img_attn_qkv, img_attn_proj,
# self_attn_qkv (original, non-diffusers names).
_ATTENTION_LAYER = re.compile(r"(?i)(^|_)(attn\d*|attention)(_|$)")
# A projection that is attention wherever it sits (e.g. the VAE's mid-block attention,
# whose parent is the plural container).
_ATTENTION_PROJECTIONS = frozenset({
    "to_q", "to_k", "to_v", "to_qkv", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "q", "k", "v",
})
# An embedder module (one segment): *embed* (x_embedder, time_text_embed, embed_tokens,
# token_embedding, pos_embed ...), LDM's *_emb (label_emb; not emb_layers / time_emb_proj),
# GPT-2's wte/wpe, T5's shared table and its relative-position bias table.
_EMBEDDING = re.compile(r"(?i)^(.*embed.*|.+_emb|wte|wpe|shared|relative_attention_bias)$")
# An input projection module (one segment): img_in, txt_in, time_in, vector_in, proj_in ...
_INPUT = re.compile(r"^\w+_in$")
_HEAD = frozenset({"lm_head", "classifier", "score", "pooler", "text_projection", "visual_projection"})
# A layer whose own name marks a (fused) feed-forward projection: to_qkv_mlp_proj, mlp, ff_proj.
_FEED_FORWARD = re.compile(r"(?i)(^|_)(mlp|ffn?)(_|\d|$)")
# A layer whose own name marks an AdaLN modulation, even one named after what it modulates.
_MODULATION = re.compile(r"(?i)(^|_)(adaln|modulation)(_|$)")
_NORM = re.compile(r"(?i)(norm|^ln(_\w+)?$|^ln\d*$|layernorm|rms)")

RECIPE_KEEPS_ATTENTION = "attention projection: recipe mixed keeps attention (--recipe compact quantizes it)"

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


def _blocks_after(segments: list[str], i: int) -> bool:
    """Whether a stack of blocks lies below segments[i]: a numeric index followed by >= 2 module names.

    ``refiner_blocks.0.attn.to_q`` and ``embedders.0.transformer.text_model...`` are blocks;
    ``to_out.0``, ``time_embed.0``, ``net.0.proj`` (an index followed by at most one name) are not.
    """
    rest = segments[i + 1:]
    for j, s in enumerate(rest):
        if s.isdigit() and sum(not t.isdigit() for t in rest[j + 1:]) >= 2:
            return True
    return False


def _within(segments: list[str], rx: re.Pattern) -> bool:
    """Whether the layer (segments, leaf dropped) sits in a module matching rx, no block stack between."""
    return any(rx.match(s) and not _blocks_after(segments, i)
               for i, s in enumerate(segments) if not s.isdigit())


def _input_projection(segments: list[str]) -> bool:
    """A module named <word>_in (or a child of one), outside every numbered block."""
    named = [i for i, s in enumerate(segments) if not s.isdigit()]
    for i in named[-2:]:
        if _INPUT.match(segments[i]) and not any(s.isdigit() for s in segments[:i]):
            return True
    return False


def classify(name: str, shape: tuple[int, ...], dtype: DType) -> TensorKind:
    """What a tensor is, from its dtype, rank and place in the module tree (rules in the module docstring)."""
    if dtype.kind is Kind.FP8:
        return TensorKind.FP8
    if dtype.kind is not Kind.FLOAT:
        return TensorKind.NONFLOAT
    segments = name.split(".")
    leaf, segments = segments[-1], segments[:-1]
    modules = [s for s in segments if not s.isdigit()]
    if leaf == "bias":
        return TensorKind.BIAS
    if len(shape) <= 1:
        return TensorKind.NORM if any(_NORM.search(m) for m in modules[-2:]) else TensorKind.VECTOR
    if leaf != "weight":
        return TensorKind.PARAM
    own = modules[-1] if modules else ""
    if _within(segments, _EMBEDDING):
        return TensorKind.EMBEDDING
    if len(shape) == 2 and _input_projection(segments):
        return TensorKind.EMBEDDING
    if any(m in _HEAD for m in modules[-2:]):
        return TensorKind.HEAD
    if len(shape) >= 3:
        return TensorKind.CONV
    if _FEED_FORWARD.search(own) or _MODULATION.search(own):
        return TensorKind.LINEAR
    parents = segments[:max(i for i, s in enumerate(segments) if not s.isdigit())] if modules else []
    if own in _ATTENTION_PROJECTIONS or _ATTENTION_LAYER.search(own) or _within(parents, _ATTENTION_MODULE):
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
    origin: str = ""      # who set it: "" for the user's --quantize/--keep, "preset flux" for a preset's
    # A preset's rule that holds in every recipe (attention fused with the MLP in one tensor elsewhere).
    every_recipe: bool = False
    _rx: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.action is Action.PASS:
            raise PolicyError("a rule can only quantize or keep")
        if not self.pattern:
            raise PolicyError("empty pattern", hint="give a glob such as '*.attn.*' or 're:...'")
        source = self.pattern[3:] if self.pattern.startswith("re:") else fnmatch.translate(self.pattern)
        try:
            object.__setattr__(self, "_rx", re.compile(source))
        except re.error as exc:
            raise PolicyError(f"bad regular expression {self.typed}: {exc}",
                              hint="patterns with re: are Python regular expressions") from None

    def matches(self, name: str) -> bool:
        return bool(self._rx.fullmatch(name) or self._rx.fullmatch(name.rsplit(".", 1)[0]))

    @property
    def label(self) -> str:
        """How a decision names this rule: ``rule --keep '*.attn.*'`` or ``preset flux: keep '...'``."""
        if self.origin:
            return f"{self.origin}: {self.action.value} {self.typed}" + (" (every recipe)" if self.every_recipe else "")
        return f"rule --{self.action.value} {self.typed}"

    @property
    def typed(self) -> str:
        """The pattern as a shell takes it back (quoted, backslashes as typed: ``'re:.*\\.attn'``)."""
        return shlex.quote(self.pattern)


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
    # Recipe "mixed": attention projections stay in high precision whatever a preset says (the
    # user's own rules, applied after, still win).
    keep_attention: bool = False

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
        recipe_applied = False
        for rule in self.rules:
            if not rule.origin and not recipe_applied:       # the preset's rules are done, the user's begin
                decision, recipe_applied = self._recipe(decision), True
            if not rule.matches(name):
                continue
            if rule.action is Action.QUANTIZE and kind not in QUANTIZABLE:
                decision = Decision(Action.KEEP, kind, f"{kind.value}: cannot quantize, {rule.label} ignored", rule)
            else:
                decision = Decision(rule.action, kind, f"{kind.value}: {rule.label}", rule)
        return decision if recipe_applied else self._recipe(decision)

    def _recipe(self, decision: Decision) -> Decision:
        """Recipe mixed: an attention projection the preset quantized is kept."""
        if (self.keep_attention and decision.kind is TensorKind.ATTENTION and decision.action is Action.QUANTIZE
                and not (decision.rule is not None and decision.rule.every_recipe)):
            return Decision(Action.KEEP, decision.kind, RECIPE_KEEPS_ATTENTION)
        return decision

    def with_preset(self, name: str, rules: tuple[Rule, ...]) -> "Policy":
        """This policy with a preset's rules placed before the user's (the user's win)."""
        labelled = tuple(Rule(r.action, r.pattern, r.origin or f"preset {name}", r.every_recipe) for r in rules)
        return Policy(labelled + self.rules, self.quantize_conv, name, self.keep_attention)

    def describe(self) -> dict:
        """A JSON-able description, recorded in output metadata."""
        return {
            "name": self.name,
            "defaults": {"linear": "quantize", "convolution": "quantize" if self.quantize_conv else "keep",
                         "other floating point": "keep", "non-float": "pass",
                         **({"attention": "keep (recipe mixed, over the preset)"} if self.keep_attention else {})},
            "rules": [[r.action.value, r.pattern] for r in self.rules],
        }

    def to_json(self) -> str:
        return json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))

    def unused_rules(self, names) -> list[Rule]:
        """Rules that matched no tensor (usually a typo worth telling the user about)."""
        return [r for r in self.rules if not any(r.matches(n) for n in names)]
