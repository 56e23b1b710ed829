"""Read stage, every layout: one ``Checkpoint`` over whatever the user points at.

    file.safetensors               -> "safetensors"
    x.safetensors.index.json       -> "sharded"           (also a folder holding one such index)
    folder with config.json        -> "model-folder"      (diffusers or transformers; single file or sharded)
    folder with model_index.json   -> "diffusers-pipeline/<component>"  (component= required)
    file.ckpt .pt .pth .bin        -> "pickle"            (torch.load(weights_only=True) only)

A ``Checkpoint`` is a ``TensorSource``: the pipeline sees one name -> TensorInfo table and reads
through ``read_into``, which dispatches to the file that holds the tensor. When a checkpoint
holds both raw and EMA weights, one copy is chosen here (``ema=``) and the other left out, so
the pipeline sees each tensor once, under its base name. Names are otherwise kept as they are
(all-in-one prefixes included); ``component_of`` splits them for the policy.

>>> with open_checkpoint("sd15.ckpt", ema=True) as ckpt:          # doctest: +SKIP
...     print(ckpt.layout, ckpt.notes)
...     for info in ckpt.tensors.values(): ...
"""
from __future__ import annotations

import os
import re

from .errors import QuantkitError, UnsupportedInputError
from .jsonfiles import JSONFileError, read_json
from .reader import MAX_HEADER_BYTES, SafetensorsFile, TensorInfo, TensorSource
from .shards import INDEX_SUFFIX, is_index_name, open_shards
from .torch_pickle import PICKLE_EXTENSIONS, PickleFile

ACCEPTED = ("pass a .safetensors file, a *.safetensors.index.json with its shards, a diffusers model folder "
            "(config.json + diffusion_pytorch_model*.safetensors or model*.safetensors), a diffusers pipeline "
            "folder (model_index.json) with a component, or a PyTorch pickle (.ckpt .pt .pth .bin)")
EMA_PREFIXES = ("model_ema.", "ema_model.", "ema.")
# All-in-one checkpoints (LDM / SGM / ComfyUI): the first prefix that matches names the component.
_COMPONENT_RE = re.compile(r"^(model\.diffusion_model|first_stage_model|cond_stage_model"
                           r"|conditioner\.embedders\.\d+|text_encoders\.[^.]+)\.(.+)$")
_SHARD_RE = re.compile(r".+-\d{5}-of-\d{5}(\.[\w-]+)?\.(safetensors|bin)$")
MAX_JSON_BYTES = 10_000_000
AMBIGUOUS = ""   # find_prefixed_ema: an LDM dot-less EMA name that fits two raw names


def component_of(name: str) -> tuple[str, str]:
    """The all-in-one component a tensor belongs to and its name inside it; ``("", name)`` when none.

    >>> component_of("first_stage_model.encoder.conv_in.weight")
    ('first_stage_model', 'encoder.conv_in.weight')
    >>> component_of("conditioner.embedders.1.model.ln_final.weight")
    ('conditioner.embedders.1', 'model.ln_final.weight')
    >>> component_of("transformer_blocks.0.attn.to_q.weight")
    ('', 'transformer_blocks.0.attn.to_q.weight')
    """
    m = _COMPONENT_RE.match(name)
    return (m.group(1), m.group(2)) if m else ("", name)


class Checkpoint(TensorSource):
    """Any supported layout as one TensorSource. Build it with ``open_checkpoint``.

    ``path`` is what the user gave; ``files`` the weight files actually read (to hash and to
    record); ``layout`` a short name; ``notes`` what was detected and chosen, in sentences.
    ``metadata`` is the safetensors metadata of a single-file checkpoint, else empty.
    A single safetensors file keeps its TensorInfos (real file offsets); other layouts get
    offsets into a virtual concatenation of their tensors (only ``nbytes`` is meaningful).
    """

    def __init__(self, path: str, layout: str, files: list[str], entries: dict[str, tuple[TensorSource, TensorInfo]],
                 *, metadata: dict[str, str], notes: list[str], readers: list[TensorSource], real_offsets: bool):
        self.path = path
        self.layout = layout
        self.files = files
        self.metadata = metadata
        self.notes = notes
        self._readers = readers
        self._map: dict[str, tuple[TensorSource, TensorInfo]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        offset = 0
        for name, (reader, inner) in entries.items():
            if real_offsets and name == inner.name:
                info = inner
            elif real_offsets:
                info = TensorInfo(name, inner.dtype, inner.shape, inner.start, inner.end)
            else:
                info = TensorInfo(name, inner.dtype, inner.shape, offset, offset + inner.nbytes)
                offset = info.end
            self.tensors[name] = info
            self._map[name] = (reader, inner)
        self.file_size = sum(os.path.getsize(f) for f in files)

    def read_into(self, info: TensorInfo, byte_offset: int, out) -> None:
        """Fill ``out`` with the bytes of ``info`` (one of ``self.tensors``) from ``byte_offset``."""
        entry = self._map.get(info.name)
        if entry is None or entry[1].nbytes != info.nbytes:
            raise KeyError(f"{info.name}: not a tensor of {self.path}")
        reader, inner = entry
        reader.read_into(inner, byte_offset, out)

    def map_bytes(self, info: TensorInfo, byte_offset: int, nbytes: int, populate: bool = False):
        entry = self._map.get(info.name)
        if entry is None or entry[1].nbytes != info.nbytes:
            raise KeyError(f"{info.name}: not a tensor of {self.path}")
        reader, inner = entry
        return reader.map_bytes(inner, byte_offset, nbytes, populate)

    def source_of(self, name: str) -> str:
        """The file that holds tensor ``name`` (for messages)."""
        return self._map[name][0].path

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self._readers = []

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, layout={self.layout!r}, {len(self.tensors)} tensors, {len(self.files)} files)"


def open_checkpoint(path: str | os.PathLike, *, component: str | None = None, ema: bool | None = False) -> Checkpoint:
    """Open whatever ``path`` is (file, index, folder, pipeline) as one validated ``Checkpoint``.

    ``component`` picks a diffusers pipeline's sub-model, or one component of an all-in-one
    checkpoint (``model.diffusion_model``, ``first_stage_model``, ... or ``unet``/``vae``/
    ``text_encoder``), its prefix removed; ``ema`` converts the EMA copy of
    the weights (under the base names) instead of the raw one; ``ema=None`` takes every
    tensor under its stored name (to read quantkit's own outputs). Nothing is ever written.
    """
    path = os.fspath(path)
    if not path:
        raise UnsupportedInputError("no input path given", hint=ACCEPTED)
    if not os.path.exists(path):
        raise UnsupportedInputError("does not exist", path=path, hint=ACCEPTED)
    notes: list[str] = []
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_index.json")):
            folder, name = _pipeline_component(path, component)
            kind, weights = _weights_in_folder(folder, notes)
            layout = f"diffusers-pipeline/{name}"
            notes.insert(0, f"diffusers pipeline: component '{name}' ({os.path.relpath(weights, path)})")
        else:
            kind, weights = _weights_in_folder(path, notes)
            layout = "model-folder" if os.path.isfile(os.path.join(path, "config.json")) else _LAYOUT[kind]
            if layout == "model-folder":
                notes.insert(0, f"model folder: {os.path.basename(weights)}{_class_name(path)}")
    elif os.path.isfile(path):
        kind, weights = _kind_of_file(path, notes), path
        layout = _LAYOUT[kind]
    else:
        raise UnsupportedInputError("not a regular file or folder", path=path, hint=ACCEPTED)
    in_file = component if not layout.startswith("diffusers-pipeline/") else None
    return _build(path, layout, kind, weights, ema, notes, in_file)


_LAYOUT = {"safetensors": "safetensors", "index": "sharded", "pickle": "pickle"}


def _kind_of_file(path: str, notes: list[str]) -> str:
    """What a file is, by its first bytes (its name only where they say nothing): a file whose
    extension lies is read as what it holds, with a note; one that holds nothing quantkit reads
    is refused with what its content looks like."""
    name = os.path.basename(path)
    named = ("safetensors" if name.endswith(".safetensors") else "index" if is_index_name(name)
             else "pickle" if name.lower().endswith(PICKLE_EXTENSIONS) else None)
    held = sniff(path)
    if named == "index" and held in ("json", None):
        return "index"      # the index reader names what is wrong with one that is not a JSON object
    if held == "pickle" and named == "safetensors":     # torch.load itself goes by a .safetensors name
        raise UnsupportedInputError("holds a PyTorch pickle, not a safetensors file", path=path,
                                    hint="rename it to *.pt: quantkit then loads it with torch.load(weights_only=True)")
    if held in ("safetensors", "pickle"):
        if named != held:
            notes.append(f"{name} holds a {_WORDS[held]}" + (" despite its extension" if named else "")
                         + f": read as one (rename it to *{_EXTENSIONS[held]})")
        return held
    if named in ("safetensors", "pickle"):
        return named        # its reader names exactly what is wrong with it (truncated, hostile header ...)
    what = f"unknown checkpoint type {os.path.splitext(name)[1] or name!r}"
    if held is not None:
        what += f" (the file holds {_WORDS[held]})"
    raise UnsupportedInputError(what, path=path, hint=ACCEPTED)


_WORDS = {"safetensors": "safetensors file", "pickle": "PyTorch pickle", "json": "JSON text", "gguf": "GGUF file"}
_EXTENSIONS = {"safetensors": ".safetensors", "pickle": ".pt"}


def sniff(path: str) -> str | None:
    """What a file's first bytes say it is: "safetensors" (an 8-byte header length, then '{'),
    "pickle" (a zip archive, as torch.save writes, or a raw pickle stream), "json", "gguf", or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.lstrip()[:1] == b"{":
        return "json"
    return None


# --component on an all-in-one file: friendly names of its prefixes.
COMPONENT_ALIASES = {"unet": "model.diffusion_model", "diffusion_model": "model.diffusion_model",
                     "transformer": "model.diffusion_model", "vae": "first_stage_model",
                     "text_encoder": "cond_stage_model"}


def _select_component(entries: dict, component: str, path: str, notes: list[str]) -> dict:
    """The tensors of one component of an all-in-one checkpoint, under their names inside it
    (``model.diffusion_model.x`` -> ``x``): a standalone model, as ComfyUI's diffusion-model and
    VAE loaders and diffusers' single-file loaders take it."""
    wanted = COMPONENT_ALIASES.get(component, component).rstrip(".")
    found: dict[str, int] = {}
    selected = {}
    for name, entry in entries.items():
        c, inner = component_of(name)
        found[c] = found.get(c, 0) + 1
        if c == wanted:
            selected[inner] = entry
    if not selected:
        present = [c for c in found if c]
        if not present:
            raise UnsupportedInputError(f"no component {component!r}: this is not a diffusers pipeline folder and "
                                        "its tensors have no all-in-one prefixes (model.diffusion_model., ...)",
                                        path=path, hint="leave out --component to convert the whole checkpoint")
        raise UnsupportedInputError(f"no component {component!r} in this checkpoint; components: {', '.join(present)}",
                                    path=path, hint="pass one of them to --component, or leave it out to convert "
                                                    "the whole checkpoint")
    notes.append(f"component {wanted!r}: {len(selected)} of {len(entries)} tensors, prefix '{wanted}.' removed")
    return selected


def _weights_in_folder(folder: str, notes: list[str]) -> tuple[str, str]:
    """The one weights entry of a model folder: ("index"|"safetensors"|"pickle", path)."""
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    # Safetensors first: Hub folders often hold the same weights as .bin pickles too.
    indexes = [n for n in names if is_index_name(n) and ".safetensors.index" in n]
    bin_indexes = [n for n in names if is_index_name(n) and n not in indexes]
    singles = [n for n in names if n.endswith(".safetensors") and not _SHARD_RE.match(n)]
    pickles = [n for n in names if n.lower().endswith(PICKLE_EXTENSIONS) and not _SHARD_RE.match(n)]
    for kind, found in (("index", indexes), ("safetensors", singles), ("index", bin_indexes), ("pickle", pickles)):
        if len(found) > 1:
            raise UnsupportedInputError(f"{len(found)} candidate weight files: {', '.join(found)}", path=folder,
                                        hint="pass the one to convert as the path (e.g. a variant's file or index)")
        if found:
            others = [n for n in indexes + bin_indexes + singles + pickles if n != found[0]]
            if others:
                notes.append(f"{found[0]} used; also in the folder, not read: {', '.join(others)}")
            return kind, os.path.join(folder, found[0])
    if any(_SHARD_RE.match(n) for n in names):
        raise UnsupportedInputError("shards without a *.safetensors.index.json", path=folder,
                                    hint="download the index file too (" + INDEX_SUFFIX + ")")
    raise UnsupportedInputError("no weights in this folder", path=folder, hint=ACCEPTED)


def _read_json(path: str) -> object:
    try:
        return read_json(path, MAX_JSON_BYTES)
    except (OSError, JSONFileError) as exc:
        raise UnsupportedInputError(f"unreadable JSON ({exc})", path=path,
                                    hint="re-download the checkpoint's JSON files") from None


def read_config(path: str) -> dict:
    """A model's config.json (transformers or diffusers) as a JSON object; unreadable, too large or
    not an object is bad input, named."""
    try:
        config = read_json(path, MAX_JSON_BYTES)
    except (OSError, JSONFileError) as exc:
        cause = exc.cause if isinstance(exc, JSONFileError) else exc
        raise UnsupportedInputError(f"config.json is unreadable ({type(cause).__name__}: {exc})", path=path,
                                    hint="fix or replace the model's config.json") from None
    if not isinstance(config, dict):
        raise UnsupportedInputError("config.json is not a JSON object", path=path,
                                    hint="fix or replace the model's config.json")
    return config


def _class_name(folder: str) -> str:
    try:
        doc = _read_json(os.path.join(folder, "config.json"))
    except QuantkitError:
        return ""
    name = doc.get("_class_name") if isinstance(doc, dict) else None
    if name is None and isinstance(doc, dict) and isinstance(doc.get("architectures"), list):
        name = ",".join(str(a) for a in doc["architectures"])
    return f" ({name})" if isinstance(name, str) and name else ""


def _pipeline_component(folder: str, component: str | None) -> tuple[str, str]:
    """The sub-folder of ``component``; an error listing the components with weights otherwise."""
    doc = _read_json(os.path.join(folder, "model_index.json"))
    if not isinstance(doc, dict):
        raise UnsupportedInputError("model_index.json is not a JSON object", path=folder,
                                    hint="re-download the pipeline")
    with_weights = []
    for name, value in doc.items():
        # Names come from an untrusted file: only plain sub-folder names are ever joined.
        if (name.startswith("_") or not isinstance(value, list) or "/" in name or "\\" in name
                or name in (".", "..") or not os.path.isdir(os.path.join(folder, name))):
            continue
        try:
            _weights_in_folder(os.path.join(folder, name), [])
        except UnsupportedInputError:
            continue
        with_weights.append(name)
    listed = ", ".join(with_weights) or "none"
    if component is None:
        raise UnsupportedInputError(f"a diffusers pipeline: choose a component (with weights: {listed})",
                                    path=folder, hint="pass --component NAME, e.g. --component "
                                    + (with_weights[0] if with_weights else "transformer"))
    if component not in with_weights:
        raise UnsupportedInputError(f"no component {component!r} with weights (with weights: {listed})",
                                    path=folder, hint="pass one of the listed names to --component")
    return os.path.join(folder, component), component


def _build(path: str, layout: str, kind: str, weights: str, use_ema: bool | None, notes: list[str],
           component: str | None = None) -> Checkpoint:
    readers: list[TensorSource] = []
    try:
        ema_entries, ema_label = {}, ""
        metadata: dict[str, str] = {}
        if kind == "safetensors":
            f = SafetensorsFile(weights)
            readers.append(f)
            entries = {n: (f, i) for n, i in f.tensors.items()}
            files, metadata = [weights], dict(f.metadata)
        elif kind == "index":
            shards = open_shards(weights)
            readers.extend(shards.opened)
            order = {f.path: k for k, f in enumerate(shards.opened)}
            entries = dict(sorted(shards.entries.items(), key=lambda e: (order[e[1][0].path], e[1][1].start)))
            files = shards.files
            notes.extend(shards.notes)
            first = shards.opened[0].metadata if shards.opened else {}
            if all(f.metadata == first for f in shards.opened):     # e.g. quantkit's own sharded outputs
                metadata = dict(first)
        else:
            p = PickleFile(weights)
            readers.append(p)
            entries = {n: (p, i) for n, i in p.tensors.items()}
            ema_entries = {n: (p, i) for n, i in p.ema_tensors.items()}
            ema_label = f"the '{p.ema_key}' entry"
            files = [weights]
            notes.extend(p.notes)
        if not entries:
            raise UnsupportedInputError("no tensors in this checkpoint", path=weights, hint=ACCEPTED)
        if use_ema is not None:
            entries = _choose_ema(entries, ema_entries, ema_label, use_ema, weights, notes)
        if component is not None:
            entries = _select_component(entries, component, weights, notes)
        else:
            _note_components(entries, notes)
        return Checkpoint(path, layout, files, entries, metadata=metadata, notes=notes, readers=readers,
                          real_offsets=kind == "safetensors")
    except BaseException:
        for r in readers:
            r.close()
        raise


def find_prefixed_ema(names) -> tuple[str, dict[str, str | None]] | None:
    """EMA copies kept under a prefix: (prefix, {ema name: base name, or None when it has none}).

    LDM's ``model_ema.`` names are the raw ``model.`` names without the prefix and with every dot
    removed (``model_ema.diffusion_modelout2weight`` is ``model.diffusion_model.out.2.weight``).
    A dot-less name that two raw names share maps to ``AMBIGUOUS`` rather than to a guess.
    """
    names = list(names)
    for prefix in EMA_PREFIXES:
        ema_names = [n for n in names if n.startswith(prefix)]
        if not ema_names:
            continue
        raw = {n for n in names if not n.startswith(prefix)}
        dotless: dict[str, str | None] = {}
        for r in raw:
            key = r.removeprefix("model.").replace(".", "")
            dotless[key] = AMBIGUOUS if key in dotless else r
        mapping: dict[str, str | None] = {}
        for e in ema_names:
            rest = e[len(prefix):]
            if rest in raw:
                mapping[e] = rest
            elif "model." + rest in raw:
                mapping[e] = "model." + rest
            else:
                mapping[e] = dotless.get(rest.replace(".", ""))
        if any(mapping.values()):
            return prefix, mapping
    return None


def _choose_ema(entries: dict, ema_entries: dict, label: str, use_ema: bool, path: str, notes: list[str]) -> dict:
    """Keep the raw or the EMA copy of each tensor under its base name; drop the other copy."""
    dropped: list[str] = []
    if not ema_entries:
        found = find_prefixed_ema(entries)
        if found is not None:
            prefix, mapping = found
            label = f"{prefix}*"
            ambiguous = [e for e, base in mapping.items() if base == AMBIGUOUS]
            if use_ema and ambiguous:
                raise UnsupportedInputError("EMA entry fits two raw tensors once dots are removed (LDM naming)",
                                            path=path, tensor=ambiguous[0],
                                            hint="convert without --ema, or re-save the EMA weights under full names")
            ema_entries = {base: entries[e] for e, base in mapping.items() if base}
            dropped = [e for e, base in mapping.items() if not base]
            entries = {n: v for n, v in entries.items() if n not in mapping}
    else:
        dropped = [n for n in ema_entries if n not in entries]
        ema_entries = {n: v for n, v in ema_entries.items() if n in entries}
    if not ema_entries:
        if use_ema:
            raise UnsupportedInputError("no EMA weights in this checkpoint", path=path,
                                        hint="leave out --ema to convert the weights it holds")
        return entries
    n = len(ema_entries)
    extra = f"; {len(dropped)} EMA entries without a base tensor left out ({', '.join(dropped[:3])}" \
            f"{', ...' if len(dropped) > 3 else ''})" if dropped else ""
    if not use_ema:
        notes.append(f"EMA weights found ({label}, {n} tensors): raw weights used, the EMA copy left out; "
                     f"pass --ema to convert the EMA copy{extra}")
        return entries
    for base, (reader, inner) in ema_entries.items():
        raw_inner = entries[base][1]
        if inner.shape != raw_inner.shape:
            raise UnsupportedInputError(f"EMA copy {inner.name} has shape {list(inner.shape)}, the weight "
                                        f"{list(raw_inner.shape)}", path=path, tensor=base,
                                        hint="the EMA copy does not match the model; convert without --ema")
    raw_only = len(entries) - n
    notes.append(f"EMA weights used ({label}): {n} tensors converted from the EMA copy under their base names"
                 f"{f', {raw_only} without an EMA copy (buffers) kept from the raw weights' if raw_only else ''}"
                 f"{extra}")
    return {name: ema_entries.get(name, entry) for name, entry in entries.items()}


def _note_components(entries: dict, notes: list[str]) -> None:
    counts: dict[str, int] = {}
    for name in entries:
        c = component_of(name)[0]
        counts[c] = counts.get(c, 0) + 1
    other = counts.pop("", 0)
    if counts:
        what = "all-in-one checkpoint" if len(counts) > 1 else "prefixed checkpoint"
        parts = ", ".join(f"{c} ({k} tensors)" for c, k in counts.items())
        notes.append(f"{what}: {parts}{f', {other} other tensors' if other else ''}; names kept as they are")
