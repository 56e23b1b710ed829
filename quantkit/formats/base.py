"""What every output format shares: the ``OutputFormat`` hooks, the registry, and the helpers
that read a layout of weights with scales back (``stored_with_scales``).

A format module subclasses ``OutputFormat`` and decorates it with ``@register``; the package's
``__init__`` imports every module (adding a format = adding a file).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..dtypes import E4M3FN, FP8Format, Granularity, Kind, fp8_of
from ..errors import FormatError, PolicyError, UnsupportedInputError
from ..options import ConvertOptions
from ..planned import Emit, Plan, PlannedTensor, Role, StoredTensor  # noqa: F401  (a format's vocabulary)
from ..policy import Action
from ..reader import TensorSource
from ..writer import OutputTensor


def layer_name(key: str) -> str:
    """``<L>`` of ``<L>.weight``."""
    return key[: -len(".weight")] if key.endswith(".weight") else key


def quantkit_metadata(fmt: "OutputFormat", plan: Plan, provenance: dict[str, str], **extra: str) -> dict[str, str]:
    """The header metadata every format writes, so a file explains itself: quantkit version,
    format, FP8 dtype, granularity, keep dtype, the effective policy, the quantized layers and
    the source's provenance. Loaders ignore metadata keys they do not know."""
    from .._version import __version__
    from ..fp8 import BLOCK_SIZE
    summary = plan.summary()
    return {
        "quantkit.version": __version__,
        "quantkit.format": fmt.name,
        "quantkit.recipe": summary["recipe"],
        "quantkit.fp8": summary["fp8"],
        "quantkit.granularity": summary["granularity"],
        "quantkit.block_size": str(BLOCK_SIZE),
        "quantkit.keep_dtype": summary["keep_dtype"],
        **extra,
        "quantkit.policy": json.dumps(summary["policy"], sort_keys=True, separators=(",", ":")),
        "quantkit.quantized": json.dumps([layer_name(t.name) for t in plan.quantized()]),
        **({"quantkit.stats": json.dumps(summary["stats"], sort_keys=True, separators=(",", ":"))}
           if summary.get("stats") is not None else {}),
        **provenance,
    }


def tensor_layout(plan: Plan, extras: Callable[[PlannedTensor], list[Emit]], leading: list[Emit] = ()) -> list[Emit]:
    """The layout loop every format shares: ``leading`` (a marker the file starts with), then every
    planned tensor under its own key in file order (its values in the output dtype), each quantized
    one followed by what the format's convention adds to it, ``extras(t)`` (its scale, markers, an
    activation scale)."""
    emits = list(leading)
    for t in plan.tensors:
        emits.append(Emit(OutputTensor(t.name, t.out_dtype, t.info.shape), Role.DATA, t.name))
        if t.action is Action.QUANTIZE:
            emits.extend(extras(t))
    return emits


INPUT_SCALE = ".input_scale"


def input_scale_key(weight_key: str) -> str:
    """``<L>.input_scale`` of ``<L>.weight``: where native, comfy and compressed-tensors keep a
    layer's static activation scale."""
    return layer_name(weight_key) + INPUT_SCALE


@dataclass(frozen=True)
class ScaledStoredTensor(StoredTensor):
    """A quantized tensor read back with the value of its static activation scale (when it has one),
    so that a conversion of this file can carry the scale over into another format's convention."""

    input_scale: float | None = None      # as stored: inputs are quantized to ``input_fp8`` as x / input_scale


def carried_input_scale(t: PlannedTensor, fmt: FP8Format = E4M3FN) -> float | None:
    """The static activation scale of the quantized tensor ``t`` in a convention that quantizes the
    layer's input to ``fmt``: from a stats file's range (``convert --stats``), else carried over from
    an FP8 source that stores one (read back as ``ScaledStoredTensor.input_scale``); None without one.

    A carried scale is moved to ``fmt``'s range: it covers ``scale * max`` of the source's input
    encoding (ComfyUI quantizes an E5M2 layer's input in E5M2), so the target's is that over ``fmt``'s
    maximum. The ratio of two FP8 maxima is a power of two (448 / 57344 = 2**-7): exact, and the same
    value when both conventions agree."""
    from ..fp8 import static_activation_scale
    if t.input_range is not None:
        return static_activation_scale(t.input_range, fmt)
    s = t.prequantized
    value = getattr(s, "input_scale", None)
    if value is None:
        return None
    return value if s.input_fp8 is fmt else value * s.input_fp8.max_finite / fmt.max_finite


def source_input_scales(plan: Plan) -> list[str]:
    """The quantized tensors whose FP8 source stores a static activation scale (a conversion of a conversion)."""
    return [t.name for t in plan.quantized() if getattr(t.prequantized, "input_scale", None) is not None]


class OutputFormat:
    name: ClassVar[str]
    summary: ClassVar[str]
    granularities: ClassVar[frozenset] = frozenset(Granularity)
    # A folder format writes DST/ (weights + config files) instead of the single file DST.
    folder: ClassVar[bool] = False
    weights_name: ClassVar[str] = "model.safetensors"
    # Whether --max-shard-size may split the weights over several files with an index.
    shardable: ClassVar[bool] = True
    # Tried after the others by detect_format (its recognizes() is the loosest).
    recognized_last: ClassVar[bool] = False
    # The key names this format's clients load, when they differ from the source's
    # (sources.open_source(names=...)): "comfyui" for the comfy formats.
    source_names: ClassVar[str | None] = None
    # Where a quantized layer's static activation scale goes: ``<L><input_scale_suffix>``.
    input_scale_suffix: ClassVar[str] = ".input_scale"

    def check(self, options: ConvertOptions) -> None:
        """Refuse options this format cannot express, before any work starts."""
        if options.granularity not in self.granularities:
            allowed = ", ".join(sorted(g.value for g in self.granularities))
            raise PolicyError(f"format {self.name!r} does not support --granularity {options.granularity.value}",
                              hint=f"use one of: {allowed}")
        if options.max_shard_bytes is not None and not self.shardable:
            raise PolicyError(f"format {self.name!r} is a single file (its loaders read no shard index)",
                              hint="drop --max-shard-size, or use --format native / compressed-tensors")

    def check_source(self, source: TensorSource) -> None:
        """Refuse a source this format cannot convert, from its header and folder alone (before any
        data is read). ``source`` is the opened checkpoint."""

    def unreadable(self, source: TensorSource, tensors: list[PlannedTensor]) -> dict[str, str]:
        """Of ``tensors`` (planned for FP8), those this format's clients cannot read as FP8: name ->
        why (``an nn.Embedding: ...``). The plan keeps them in high precision with that reason,
        and refuses a user's own --quantize rule that asks for one."""
        return {}

    def check_plan(self, plan: Plan) -> None:
        """Refuse a plan this format cannot write (a tensor its clients cannot load as planned),
        before any layout is built."""

    def layout(self, plan: Plan) -> list[Emit]:
        """Every output tensor, in file order (of a plan ``check_plan`` accepted)."""
        raise NotImplementedError

    def metadata(self, plan: Plan, provenance: dict[str, str]) -> dict[str, str]:
        """The safetensors header's ``__metadata__``."""
        raise NotImplementedError

    def stored(self, file: TensorSource) -> dict[str, StoredTensor]:
        """Read back: source key -> how it is stored in ``file`` (a file of this format); a file
        that breaks the format's conventions raises ``FormatError``."""
        raise NotImplementedError

    def finalize(self, folder: str, plan: Plan, source: TensorSource) -> list[str]:
        """Folder formats: write the files beside the weights (config, tokenizer...) into
        ``folder``; returns their names relative to it. Called after the weights are complete;
        ``source`` is the opened checkpoint."""
        return []

    def warnings(self, plan: Plan) -> list[str]:
        """Things a user of this format should know about this plan (not errors). Subclasses extend
        this list (``super().warnings(plan) + [...]``)."""
        dropped = self.dropped_input_scales(plan)
        if not dropped:
            return []
        return [f"format {self.name}: {len(dropped)} static input scale(s) of the FP8 source are not carried over "
                f"({_examples(dropped)}): this format has no place for them, so these layers run weight-only; "
                "use --format native or comfy to keep them"]

    def dropped_input_scales(self, plan: Plan) -> list[str]:
        """The quantized tensors of an FP8 source that stores a static activation scale, for which the
        output (``plan.outputs``) holds none."""
        written = {e.spec.key for e in plan.outputs}
        return [name for name in source_input_scales(plan) if layer_name(name) + self.input_scale_suffix not in written]

    @classmethod
    def recognizes(cls, file: TensorSource) -> bool:
        """Whether ``file`` looks written in this format."""
        return False

    # ------------------------------------------------------------------ what a release's card says
    # (quantkit.publish.card renders these; a format without them gets the generic text)

    # The model hub tags of a release in this format (besides "fp8", the FP8 dtype, "quantized", "quantkit").
    card_tags: ClassVar[tuple[str, ...]] = ()
    # Whether transformers loads this format's output itself (``from_pretrained``): validation at the
    # model's output then runs the client rather than the runtime.
    loaded_by_transformers: ClassVar[bool] = False

    def card_library(self, source_card: dict) -> str | None:
        """The card's ``library_name`` (the library that loads the release), given the source's card
        front matter; None to leave it out."""
        return None

    def card_pipeline_tag(self, source_card: dict) -> str | None:
        """The card's ``pipeline_tag`` (the hub's task), for a release the hub's task runs on."""
        return None

    def how_to_load(self, target: str, prov: dict) -> str:
        """The card's "How to load" text for this format (before the runtime's snippet): ``target`` is
        the weights file (or "." for several), ``prov`` the release's provenance record."""
        version = prov["versions"]["converted_with"]["quantkit"]
        return (f"quantkit reads its own layout back (FP8 weights dequantized as `W = q * scale`, kept tensors as "
                f"stored), for any PyTorch model with these keys:\n\n```python\n"
                f"from quantkit import load_dequantized   # pip install quantkit=={version}\n"
                f"model.load_state_dict(load_dequantized(\"{target}\"))\n```\n")

    def runtime_snippet(self, target: str) -> tuple[str, str, str]:
        """(imports, the expression that builds the model, the path given to ``qr.load``) of the card's
        quantkit runtime example."""
        return "", "...   # the original model's class, built from its config", target


REGISTRY: dict[str, type[OutputFormat]] = {}


def register(cls: type[OutputFormat]) -> type[OutputFormat]:
    """Add a format to the table under its name; a second format of the same name is an error."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"format {cls.name!r} is registered twice ({REGISTRY[cls.name].__module__}, {cls.__module__})")
    REGISTRY[cls.name] = cls
    return cls


def get_format(name: str) -> OutputFormat:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise PolicyError(f"unknown format {name!r}", hint=f"known formats: {', '.join(sorted(REGISTRY))}") from None


def detect_format(file: TensorSource) -> OutputFormat:
    """The format that wrote ``file``, from its metadata (quantkit outputs record it)."""
    name = file.metadata.get("quantkit.format")
    if name in REGISTRY:
        return REGISTRY[name]()
    for cls in sorted(REGISTRY.values(), key=lambda c: c.recognized_last):
        if cls.recognizes(file):
            return cls()
    raise UnsupportedInputError("not a quantized checkpoint in a format quantkit knows", path=file.path,
                                hint=f"known formats: {', '.join(sorted(REGISTRY))}")


def stored_with_scales(file: TensorSource, scale_suffix: str, granularity_of, *, skip=lambda key: False,
                       weights_only: bool = False) -> dict[str, StoredTensor]:
    """Read back a layout where each FP8 tensor ``<key>`` has its scale under ``<key><scale_suffix>``
    (``granularity_of(weight_shape, scale_shape)`` says which granularity it encodes) and, for a
    ``<L>.weight``, maybe a static activation scale ``<L>.input_scale``: source key -> StoredTensor.
    Scale keys, and keys for which ``skip(key)`` holds, are not source tensors.
    ``weights_only``: only ``*.weight`` keys carry scales."""
    out = {}
    for key, info in file.tensors.items():
        if key.endswith(scale_suffix) and key[: -len(scale_suffix)] in file.tensors or skip(key):
            continue
        if key.endswith(INPUT_SCALE) and _is_fp8(file, key[: -len(INPUT_SCALE)] + ".weight"):
            continue
        scale = file.tensors.get(key + scale_suffix) if key.endswith(".weight") or not weights_only else None
        fp8 = fp8_of(info.dtype.code)
        if scale is None or fp8 is None:
            out[key] = StoredTensor(key, key)
            continue
        inputs = file.tensors.get(input_scale_key(key)) if key.endswith(".weight") else None
        try:
            inputs_key = _one_value(file, inputs)
            out[key] = ScaledStoredTensor(key, key, scale.name, granularity_of(info.shape, scale.shape), fp8,
                                          input_scale_key=inputs_key, input_scale=_value(file, inputs_key))
        except FormatError as exc:
            exc.path, exc.tensor = file.path, key
            raise
    return out


def _examples(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _is_fp8(file: TensorSource, key: str) -> bool:
    info = file.tensors.get(key)
    return info is not None and fp8_of(info.dtype.code) is not None


def _value(file: TensorSource, key: str | None) -> float | None:
    """The one float value of the tensor ``key`` (an activation scale), or None without a key."""
    if key is None:
        return None
    return float(file.read_tensor(file.tensors[key]).float().reshape(-1)[0])


def _one_value(file: TensorSource, info) -> str | None:
    """The key of an activation scale (one float value, [] or [1]), or None when there is none."""
    if info is None:
        return None
    if info.dtype.kind is not Kind.FLOAT or info.numel != 1 or len(info.shape) > 1:
        raise FormatError(f"an input scale must be one float value ([] or [1]), not {info.dtype.code} "
                          f"{list(info.shape)}", path=file.path, tensor=info.name)
    return info.name
