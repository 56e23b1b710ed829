"""Stats files: what ``quantkit calibrate`` measured, read by ``convert --stats`` and ``stats show``.

One safetensors file (written and read by quantkit's own checked writer and reader):

    weight/<tensor>   F32, shaped like the tensor's scale (``quantkit.fp8.scale_shape``): the weight
                      observer's range; the scale is ``range / fp8 max`` (``Stats.weight_scale``)
    input/<tensor>    F32 []: the activation observer's range of the input of the layer whose weight
                      is ``<tensor>`` (static, per tensor); ``Stats.input_scale`` is the power of two
                      at or above ``range / 448`` (``quantkit.fp8.static_activation_scale``)
    __metadata__["quantkit.stats"]: JSON
        {"version": 1,
         "source": {"name", "sha256", "bytes", "fingerprint", "files": [{"name", "sha256", "bytes"}]},
         "granularity", "fp8", "weight_observer", "activation_observer" (null: weights only),
         "samples" (calibration samples observed: sentences, diffusion rows, or a hook's batches),
         "inputs" (the calibration inputs, in words),
         "options" (the policy options as given), "layers": {<tensor>: {figure: number}},
         "hessians" (only with --rounding gptq): {"file": the sidecar beside this file
         (``calibration.hessians``), "id", "bytes", "layers": {<tensor>: <key>}, "tokens": {<key>: n},
         "per_sample": [<tensor>, ...] (one input vector per sample: no Hessian, nearest)}}

Tensor names are the source checkpoint's own (not ComfyUI's renaming: a converter writing other
names maps them). ``layers`` holds per-layer figures for ``stats show`` (``weight_absmax``,
``weight_rms``, ``input_absmax``, ``input_rms``, ``input_values``; any may be absent).

The source is named by its SHA256 (as a manifest names it: ``hashing.combined_digest`` of its
files) and by a fingerprint of its header (tensor names, dtypes, shapes), which a converter checks
before any work: stats from another checkpoint are refused with both hashes named.

    >>> import torch
    >>> from quantkit.calibration.stats import Stats
    >>> s = Stats(source={"name": "m.safetensors", "sha256": "ab" * 32, "fingerprint": "cd" * 32},
    ...           granularity="tensor", fp8="float8_e4m3fn", weight_observer="absmax",
    ...           weights={"fc.weight": torch.tensor(4.48)}, activations={"fc.weight": torch.tensor(896.0)})
    >>> float(s.weight_scale("fc.weight")), s.input_scale("fc.weight")
    (0.009999999776482582, 2.0)
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from quantkit import dtypes
from quantkit.dtypes import E4M3FN, FP8_FORMATS, FP8Format, Granularity
from quantkit.errors import UnsupportedInputError
from quantkit.jsonfiles import JSONFileError, parse_json
from quantkit.fp8 import scale_from_absmax, scale_shape, static_activation_scale

VERSION = 1
META_KEY = "quantkit.stats"
WEIGHT, INPUT = "weight/", "input/"


class StatsMismatchError(UnsupportedInputError):
    """Stats calibrated on another checkpoint than the one being converted."""


@dataclass
class Stats:
    source: dict                                   # name, sha256, bytes, fingerprint, files
    granularity: Granularity | str
    fp8: FP8Format | str
    weight_observer: str
    weights: dict[str, torch.Tensor] = field(default_factory=dict)       # tensor -> range, scale-shaped
    activations: dict[str, torch.Tensor] = field(default_factory=dict)   # tensor -> input range, []
    activation_observer: str | None = None
    samples: int = 0
    inputs: str | None = None
    options: dict = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    # GPTQ: the Hessian sidecar (calibration.hessians): file, id, bytes, layers {tensor: key}, tokens {key: n}
    hessians: dict | None = None
    path: str | None = None                        # the file it was read from

    def __post_init__(self):
        self.granularity = Granularity(self.granularity)
        if isinstance(self.fp8, str):
            if self.fp8 not in FP8_FORMATS:
                raise ValueError(f"unknown FP8 dtype {self.fp8!r}")
            self.fp8 = FP8_FORMATS[self.fp8]

    @property
    def source_sha256(self) -> str:
        return self.source.get("sha256", "")

    def weight_scale(self, name: str) -> torch.Tensor:
        """The scale of weight ``name`` (float32, scale-shaped): its range over the FP8 maximum."""
        return scale_from_absmax(self.weights[name].float(), self.fp8)

    def input_scale(self, name: str) -> float | None:
        """The static E4M3 activation scale of the layer whose weight is ``name`` (the power of two at
        or above range / 448: ``fp8.static_activation_scale``), or None. (A format whose client
        quantizes activations in another FP8 dtype uses that dtype's maximum: ComfyUI runs an E5M2
        layer's input in E5M2.)"""
        rng = self.activations.get(name)
        if rng is None:
            return None
        return static_activation_scale(float(rng), E4M3FN)

    def describe(self) -> dict:
        """What the stats are, for manifests, provenance and reports (no tensors)."""
        return {"path": self.path, "source_sha256": self.source_sha256, "granularity": self.granularity.value,
                "fp8": self.fp8.name, "weight_observer": self.weight_observer,
                "activation_observer": self.activation_observer, "samples": self.samples, "inputs": self.inputs,
                "weights": len(self.weights), "activations": len(self.activations),
                "rounding": "gptq" if self.hessians else "nearest",
                "hessians": {k: self.hessians.get(k) for k in ("file", "bytes")} if self.hessians else None}


def fingerprint(tensors) -> str:
    """SHA256 of a checkpoint's header as a list of (name, dtype, shape), sorted by name: equal for
    the same tensors, whatever their order or file layout. ``tensors``: name -> TensorInfo."""
    doc = sorted([name, info.dtype.code, list(info.shape)] for name, info in tensors.items())
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def save(stats: Stats, path: str, *, overwrite: bool = False) -> str:
    """Write ``stats`` to ``path`` (a temporary file renamed when complete); returns its SHA256."""
    from quantkit.writer import OutputTensor, SafetensorsWriter
    entries = [(WEIGHT + n, t) for n, t in sorted(stats.weights.items())]
    entries += [(INPUT + n, t.reshape(())) for n, t in sorted(stats.activations.items())]
    arrays = [(k, t.detach().float().contiguous().cpu()) for k, t in entries]
    specs = [OutputTensor(k, dtypes.F32, tuple(t.shape)) for k, t in arrays]
    doc = {"version": VERSION, "source": stats.source, "granularity": stats.granularity.value,
           "fp8": stats.fp8.name, "weight_observer": stats.weight_observer,
           "activation_observer": stats.activation_observer, "samples": stats.samples, "inputs": stats.inputs,
           "options": stats.options, "layers": _finite(stats.layers)}
    if stats.hessians is not None:
        doc["hessians"] = stats.hessians
    meta = {META_KEY: json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)}
    with SafetensorsWriter(path, specs, meta, overwrite=overwrite) as writer:
        for _, t in arrays:
            writer.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return writer.finish()


def load(path: str) -> Stats:
    """Read a stats file; anything that is not one ``quantkit calibrate`` wrote (or was edited into
    something else) raises a one-line ``UnsupportedInputError`` naming the file and what is wrong."""
    from quantkit.reader import SafetensorsFile
    with SafetensorsFile(path) as f:
        raw = f.metadata.get(META_KEY)
        if raw is None:
            raise UnsupportedInputError("not a quantkit stats file (no quantkit.stats metadata)", path=path,
                                        hint="make one with: quantkit calibrate SRC -o STATS")
        doc = _document(raw, path)
        granularity = Granularity(doc["granularity"])
        weights, activations = {}, {}
        for key, info in f.tensors.items():
            if info.dtype is not dtypes.F32:
                raise UnsupportedInputError(f"a statistic must be F32, not {info.dtype.code}", path=path, tensor=key)
            if key.startswith(WEIGHT):
                _check_rank(info.shape, granularity, path, key)
            elif not key.startswith(INPUT):
                raise UnsupportedInputError("unexpected tensor in a stats file (neither weight/ nor input/)",
                                            path=path, tensor=key, hint="re-run quantkit calibrate")
            elif math.prod(info.shape) != 1:
                raise UnsupportedInputError(f"an input range is one value, not shaped {list(info.shape)}", path=path,
                                            tensor=key, hint="re-run quantkit calibrate")
            value = f.read_tensor(info).float().clone()
            if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise UnsupportedInputError("a statistic is negative, NaN or Inf", path=path, tensor=key,
                                            hint="re-run quantkit calibrate")
            if key.startswith(WEIGHT):
                weights[key[len(WEIGHT):]] = value
            else:
                activations[key[len(INPUT):]] = value.reshape(())
    return Stats(source=doc["source"], granularity=granularity, fp8=doc["fp8"],
                 weight_observer=doc["weight_observer"], weights=weights, activations=activations,
                 activation_observer=doc.get("activation_observer"), samples=doc.get("samples") or 0,
                 inputs=doc.get("inputs"), options=doc.get("options") or {}, layers=doc.get("layers") or {},
                 hessians=doc.get("hessians"), path=path)


def _document(raw: str, path: str) -> dict:
    """The ``quantkit.stats`` JSON, every field of the type ``save`` writes (a hand-edited one is
    refused by field, never let through to fail later)."""
    def refuse(what: str):
        return UnsupportedInputError(f"its quantkit.stats metadata {what}", path=path, hint="re-run quantkit calibrate")
    try:
        doc = parse_json(raw, path, parse_constant=_bad_constant)
    except JSONFileError as exc:
        raise refuse(f"is not JSON ({exc})") from None
    if not _all_finite(doc):                   # 1e400 parses as inf
        raise refuse("holds a number out of range (Infinity)")
    if not isinstance(doc, dict) or doc.get("version") != VERSION or isinstance(doc.get("version"), bool):
        version = doc.get("version") if isinstance(doc, dict) else None
        raise UnsupportedInputError(f"stats file version {version!r}; this quantkit reads version {VERSION}",
                                    path=path, hint="re-run quantkit calibrate with this quantkit")
    for key in ("source", "granularity", "fp8", "weight_observer"):
        if key not in doc:
            raise refuse(f"lacks {key!r}")
    source = doc["source"]
    if not isinstance(source, dict) or not isinstance(source.get("sha256"), str) or \
            not all(isinstance(source.get(k), (str, type(None))) for k in ("name", "fingerprint")):
        raise refuse("has a 'source' that is not {name, sha256, fingerprint, ...} strings")
    if not isinstance(doc["granularity"], str) or doc["granularity"] not in {g.value for g in Granularity}:
        raise refuse(f"has granularity {doc['granularity']!r}: one of {', '.join(g.value for g in Granularity)}")
    if not isinstance(doc["fp8"], str) or doc["fp8"] not in FP8_FORMATS:
        raise refuse(f"has fp8 {doc['fp8']!r}: one of {', '.join(FP8_FORMATS)}")
    for key, optional in (("weight_observer", False), ("activation_observer", True), ("inputs", True)):
        if not isinstance(doc.get(key), str) and not (optional and doc.get(key) is None):
            raise refuse(f"has {key} {doc.get(key)!r}: a string" + (" or null" if optional else ""))
    samples = doc.get("samples") or 0
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise refuse(f"has samples {samples!r}: a count")
    if not isinstance(doc.get("options", {}), dict):
        raise refuse("has 'options' that is not an object")
    layers = doc.get("layers", {})
    if not isinstance(layers, dict) or not all(isinstance(f, dict) for f in layers.values()):
        raise refuse("has 'layers' that is not {tensor: {figure: number}}")
    for name, figures in layers.items():
        for k, v in figures.items():
            if not (v is None or isinstance(v, (int, float))):
                raise refuse(f"has layers[{name!r}][{k!r}] = {v!r}: a number")
    if not _hessian_record(doc.get("hessians")):
        raise refuse("has 'hessians' that is not {file, id, layers: {tensor: key}, tokens: {key: count}}")
    return doc


def _hessian_record(record) -> bool:
    """A ``hessians`` record as ``calibrate --rounding gptq`` writes it (or none)."""
    if record is None:
        return True
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("file", "id")):
        return False
    layers, tokens = record.get("layers"), record.get("tokens")
    return (isinstance(layers, dict) and all(isinstance(k, str) for k in layers.values())
            and isinstance(tokens, dict)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in tokens.values())
            and set(layers.values()) <= set(tokens) and "/" not in record["file"] and "\\" not in record["file"])


def _all_finite(value) -> bool:
    """No Infinity anywhere in a parsed JSON value (iterative: the parser bounded its depth already)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


def _bad_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_rank(shape, granularity: Granularity, path: str, key: str) -> None:
    """A weight statistic is shaped like a scale of ``granularity`` (the source's shapes are checked
    at convert: ``check_shapes``)."""
    ok = (shape == () if granularity is Granularity.TENSOR else
          len(shape) == 2 and (shape[1] == 1 or granularity is Granularity.BLOCK))
    if not ok:
        want = {"tensor": "[]", "channel": "[rows, 1]", "block": "[row tiles, column tiles]"}[granularity.value]
        raise UnsupportedInputError(f"statistic shaped {list(shape)}; a {granularity.value} scale is {want}",
                                    path=path, tensor=key, hint="re-run quantkit calibrate")


def check_shapes(stats: Stats, tensors) -> None:
    """Every weight statistic must be shaped like the scale of the source tensor it names
    (``tensors``: name -> TensorInfo of the source under its own names)."""
    for name, rng in stats.weights.items():
        info = tensors.get(name)
        if info is None:
            raise StatsMismatchError("the stats name a tensor this checkpoint does not have", path=stats.path,
                                     tensor=name, hint="calibrate this checkpoint")
        want = scale_shape(info.shape, stats.granularity)
        if tuple(rng.shape) != tuple(want):
            raise StatsMismatchError(f"statistic shaped {list(rng.shape)}, the {stats.granularity.value} scale of "
                                     f"{list(info.shape)} is {list(want)}", path=stats.path, tensor=name,
                                     hint="re-run quantkit calibrate")


def mismatch(stats: Stats, source_sha256: str, source_path: str) -> StatsMismatchError:
    """The error for stats calibrated on another checkpoint, naming both SHA256s."""
    return StatsMismatchError(f"calibrated on a checkpoint with SHA256 {stats.source_sha256 or '?'} "
                              f"({stats.source.get('name', '?')}), but {source_path} has SHA256 {source_sha256}",
                              path=stats.path, hint="calibrate this checkpoint with quantkit calibrate, or pass "
                                                    "--force-stats to use them anyway")


def _finite(layers: dict) -> dict:
    """Per-layer figures as JSON numbers (NaN/Inf become null)."""
    return {name: {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in figures.items()}
            for name, figures in layers.items()}

