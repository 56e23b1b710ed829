"""Read stage for sharded checkpoints: a ``*.safetensors.index.json`` and the shards it names.

The index is untrusted input like a header: a capped JSON object without duplicate keys whose
``weight_map`` maps tensor names to shard file names. A shard name must stay inside the index's
folder (no absolute path, no ``..``, no sub-folder); a shard may still be a symlink (the Hugging
Face cache links snapshots to blobs), and is then opened where it points. Every shard's own header
is validated by ``SafetensorsFile`` before anything is read, and the two must agree: each listed
tensor is in its shard and no tensor is in two shards.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import HeaderError, UnsupportedInputError
from .jsonfiles import JSONFileError, read_json
from .reader import SafetensorsFile, TensorInfo

MAX_INDEX_BYTES = 100_000_000
INDEX_SUFFIX = ".safetensors.index.json"
INDEX_NAME = "model" + INDEX_SUFFIX           # the index quantkit writes for a sharded output
_HINT = "the index does not match its shards; re-download the checkpoint or re-save it with save_pretrained"


def is_index_name(name: str) -> bool:
    """``model.safetensors.index.json`` (also diffusers' variant form ``x.safetensors.index.fp16.json``)
    or an index of pickle shards, ``pytorch_model.bin.index.json``."""
    return name.endswith(".json") and (".safetensors.index" in name or ".bin.index" in name)


SHARD_EXTENSIONS = (".safetensors", ".bin")


@dataclass
class Shards:
    """The shards of one index, opened: tensor name -> (shard file, its TensorInfo)."""

    index_path: str
    files: list[str]
    entries: dict[str, tuple[SafetensorsFile, TensorInfo]]
    notes: list[str] = field(default_factory=list)
    opened: list[SafetensorsFile] = field(default_factory=list)

    def close(self) -> None:
        for f in self.opened:
            f.close()


def read_index(index_path: str) -> dict[str, str]:
    """The validated ``weight_map`` of an index file (tensor name -> shard file name)."""
    try:
        doc = read_json(index_path, MAX_INDEX_BYTES)
    except OSError as exc:
        raise UnsupportedInputError(f"cannot read the index: {exc.strerror}", path=index_path,
                                    hint="check the path and its permissions") from None
    except JSONFileError as exc:
        what = (f"index is {exc.size} bytes, past the {MAX_INDEX_BYTES}-byte cap" if exc.size is not None else
                f"duplicate key '{exc.duplicate}' in the header" if exc.duplicate is not None else
                f"index is not UTF-8 JSON ({exc})")
        raise HeaderError(what, path=index_path, hint=_HINT) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise HeaderError("index must be a JSON object whose 'weight_map' maps tensor names to shard file names",
                          path=index_path, hint=_HINT)
    if not weight_map:
        raise UnsupportedInputError("index lists no tensors", path=index_path, hint=_HINT)
    for name, shard in weight_map.items():
        _check_shard_name(shard, name, index_path)
    return weight_map


def _check_shard_name(shard: str, tensor: str, index_path: str) -> None:
    parts = shard.replace("\\", "/").split("/")
    if (not shard or "\x00" in shard or os.path.isabs(shard) or len(parts) != 1 or shard in (".", "..")
            or os.path.splitdrive(shard)[0]):
        raise HeaderError(f"shard name {shard!r} is not a file name inside the index's folder", path=index_path,
                          tensor=tensor, hint="an index may only name shards beside it; this one is broken or hostile")
    if not shard.endswith(SHARD_EXTENSIONS):
        raise UnsupportedInputError(f"shard {shard!r} is not a .safetensors or .bin file", path=index_path,
                                    tensor=tensor, hint="an index names safetensors or PyTorch (.bin) shards")


def open_shards(index_path: str) -> Shards:
    """Open and cross-check every shard of ``index_path``; closes what it opened if anything fails."""
    weight_map = read_index(index_path)
    folder = os.path.dirname(index_path)
    order = list(dict.fromkeys(weight_map.values()))
    shards = Shards(index_path, [os.path.join(folder, s) for s in order], {})
    try:
        _open_all(shards, weight_map, order, folder)
    except BaseException:
        shards.close()
        raise
    return shards


def _open_shard(path: str):
    """A safetensors shard, or a PyTorch pickle shard (``pytorch_model-00001-of-00002.bin``, a flat
    state dict, loaded with ``weights_only=True`` like any pickle)."""
    if path.endswith(".bin"):
        from .torch_pickle import PickleFile
        return PickleFile(path)
    return SafetensorsFile(path)


def _open_all(shards: Shards, weight_map: dict[str, str], order: list[str], folder: str) -> None:
    by_shard: dict[str, SafetensorsFile] = {}
    for shard, path in zip(order, shards.files):
        if not os.path.isfile(path):
            tensor = next(n for n, s in weight_map.items() if s == shard)
            raise UnsupportedInputError(f"shard {shard!r} named by the index is missing", path=shards.index_path,
                                        tensor=tensor, hint="download every shard listed in the index")
        f = _open_shard(path)
        shards.opened.append(f)
        by_shard[shard] = f
    for name, shard in weight_map.items():
        info = by_shard[shard].tensors.get(name)
        if info is None:
            raise HeaderError(f"listed in shard {shard!r}, which does not hold it", path=shards.index_path,
                              tensor=name, hint=_HINT)
        shards.entries[name] = (by_shard[shard], info)
    unlisted = []
    for shard, f in by_shard.items():
        for name, info in f.tensors.items():
            if weight_map.get(name) == shard:
                continue
            if name in weight_map or name in shards.entries:
                other = weight_map.get(name) or os.path.basename(shards.entries[name][0].path)
                raise HeaderError(f"tensor is in two shards ({other!r} and {shard!r})", path=shards.index_path,
                                  tensor=name, hint=_HINT)
            shards.entries[name] = (f, info)
            unlisted.append(name)
    shards.notes.append(f"sharded checkpoint: {len(order)} shards ({os.path.basename(shards.index_path)})")
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        shards.notes.append(f"{len(unlisted)} tensors are in shards but not in the index; they are included "
                            f"(loaders read whole shards): {shown}")


# ----------------------------------------------------------------------------- writing

def shard_names(count: int, stem: str = "model") -> list[str]:
    """Hugging Face's shard names: ``model-00001-of-00003.safetensors`` ..."""
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def split_emits(emits: list, max_bytes: int) -> list[list]:
    """Cut the output's tensors (``formats.Emit``, in file order) into shards of at most
    ``max_bytes`` of tensor data. A weight stays in one shard with its scale and markers (the
    emits of one source tensor are never split); a group larger than ``max_bytes`` gets a shard
    of its own, as ``save_pretrained`` does."""
    groups: list[list] = []
    for e in emits:
        if groups and e.source is not None and groups[-1][0].source == e.source:
            groups[-1].append(e)
        else:
            groups.append([e])
    shards: list[list] = [[]]
    size = 0
    for g in groups:
        n = sum(e.spec.nbytes for e in g)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(g)
        size += n
    return shards


def oversized_note(shards: list[list], max_bytes: int) -> str | None:
    """A warning when ``split_emits`` had to put tensors larger than ``max_bytes`` in shards of their
    own (a tensor is never split), or None."""
    over = [sh for sh in shards if sum(e.spec.nbytes for e in sh) > max_bytes]
    if not over:
        return None
    big = max(over, key=lambda sh: sum(e.spec.nbytes for e in sh))
    largest = sum(e.spec.nbytes for e in big)
    return (f"{len(over)} of the {len(shards)} shards {'is' if len(over) == 1 else 'are'} over --max-shard-size "
            f"({max_bytes} bytes): a tensor is never split, so a larger one is a shard of its own (largest: "
            f"{big[0].spec.key}, {largest} bytes); give --max-shard-size {largest} or more to keep every shard "
            "within it")


def index_document(shards: dict[str, list], metadata: dict[str, str] | None = None) -> dict:
    """The ``model.safetensors.index.json`` of shard file name -> its emits."""
    weight_map = {e.spec.key: name for name, emits in shards.items() for e in emits}
    total = sum(e.spec.nbytes for emits in shards.values() for e in emits)
    return {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
