"""The Hessian sidecar: the input Hessians ``calibrate --rounding gptq`` gathered, for ``convert --rounding gptq``.

A safetensors file next to the stats file (``<stats>.hessians.safetensors``), which the stats
file names (``Stats.hessians``: file, id, bytes, layer -> key, tokens per key). Never inside JSON:
a FLUX MLP input's Hessian alone is 0.6 GB.

    hessian/<tensor>   F32 [n (n + 1) / 2]: the upper triangle of H = sum x x^T (float32) of the
                       input of the layer whose weight is ``<tensor>``, row by row
                       (``quantkit.gptq.pack_rows``); layers that take the same input (q, k, v)
                       share one entry, named after the first of them that ran.
    __metadata__["quantkit.hessians"]: JSON {"version": 1, "id": <uuid the stats file records>,
                       "packing": "upper-rows"}

The file is written as the Hessians complete, in the order the model runs its layers, so only
the Hessians still gathering are in memory: the header's room is reserved at the start (its size
is bounded by the names that can appear) and filled in, padded with spaces, when the last tensor
is in. Written under a temporary name and renamed when complete.

    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "m.hessians.safetensors")
    >>> w = HessianWriter(path, ["fc.weight"]); w.add("fc.weight", torch.eye(2), tokens=4)
    >>> record = w.finish(); record["tokens"]
    {'fc.weight': 4}
    >>> load_hessian(path, "fc.weight").tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""
from __future__ import annotations

import json
import os
import uuid

import torch

from quantkit import dtypes
from quantkit.errors import OutputError, UnsupportedInputError
from quantkit.jsonfiles import JSONFileError, parse_json
from quantkit.gptq import ACT_ORDER, BLOCK_SIZE as GPTQ_BLOCK, PERCDAMP, features_of, pack_rows, unpack
from quantkit.writer import check_no_other_writer, temp_path_for

VERSION = 1
META_KEY = "quantkit.hessians"
PREFIX = "hessian/"
SUFFIX = ".hessians.safetensors"


def sidecar_path(stats_path: str) -> str:
    """Where the Hessians of the stats file ``stats_path`` go: beside it, named after it."""
    base = stats_path[:-len(".safetensors")] if stats_path.endswith(".safetensors") else stats_path
    return base + SUFFIX


class HessianWriter:
    """Appends packed Hessians to ``path`` as they complete (``add``), then writes the header (``finish``).
    ``names``: every key that may be added (the header's room is reserved from them)."""

    def __init__(self, path: str, names, *, overwrite: bool = False):
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise OutputError("destination exists", path=path, hint="pass --overwrite to replace it")
        check_no_other_writer(self.path)
        self.id = uuid.uuid4().hex
        # Room for every entry at its longest (name, F32, a shape and two offsets of 20 digits) and the metadata.
        self.room = sum(len(json.dumps(PREFIX + n)) + 128 for n in names) + 256     # an entry's rest: <= 108 bytes
        self.room += -self.room % 8
        self.temp = temp_path_for(self.path)
        self.entries: dict[str, dict] = {}
        self.tokens: dict[str, int] = {}
        self.offset = 0
        try:
            self.file = open(self.temp, "xb")
            self.file.write(b"\0" * (8 + self.room))
        except OSError as exc:
            raise OutputError(f"cannot write the Hessian sidecar: {exc.strerror}", path=self.path,
                              hint="free space or choose another -o") from None

    def add(self, key: str, hessian: torch.Tensor, tokens: int) -> None:
        """Append the Hessian of ``key`` (float32 [n, n], symmetric) gathered over ``tokens`` input rows."""
        n = hessian.shape[0]
        try:
            for row in pack_rows(hessian.float()):
                self.file.write(row.contiguous().numpy().tobytes())
        except OSError as exc:
            self.abort()
            what = "disk full" if exc.errno == 28 else exc.strerror
            raise OutputError(f"cannot write the Hessian sidecar: {what}", path=self.path,
                              hint="free space (a FLUX MLP input's Hessian is 0.3 GB packed) or choose another -o") \
                from None
        nbytes = n * (n + 1) // 2 * 4
        self.entries[PREFIX + key] = {"dtype": dtypes.F32.code, "shape": [n * (n + 1) // 2],
                                      "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes
        self.tokens[key] = int(tokens)

    def finish(self) -> dict:
        """Write the header, sync and rename; the record the stats file keeps (file, id, bytes, tokens)."""
        doc = {"__metadata__": {META_KEY: json.dumps({"version": VERSION, "id": self.id, "packing": "upper-rows"})},
               **self.entries}
        body = json.dumps(doc, separators=(",", ":")).encode()
        if len(body) > self.room:                 # the room was reserved from every possible name
            self.abort()
            raise RuntimeError(f"Hessian sidecar header {len(body)} bytes, room for {self.room}")
        try:
            self.file.seek(0)
            self.file.write(self.room.to_bytes(8, "little") + body + b" " * (self.room - len(body)))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temp, self.path)
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write the Hessian sidecar: {exc.strerror}", path=self.path,
                              hint="free space or choose another -o") from None
        return {"file": os.path.basename(self.path), "id": self.id, "bytes": 8 + self.room + self.offset,
                "tokens": dict(self.tokens)}

    def abort(self) -> None:
        try:
            self.file.close()
        except (OSError, AttributeError):
            pass
        try:
            os.unlink(self.temp)
        except OSError:
            pass


    def remove(self) -> None:
        """The finished sidecar removed: the stats file that was to name it could not be written."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def sidecar_of(stats_path: str | None, record: dict) -> str:
    """The sidecar file a stats file's Hessian record names (beside the stats file)."""
    folder = os.path.dirname(os.path.abspath(stats_path)) if stats_path else os.getcwd()
    return os.path.join(folder, os.path.basename(record["file"]))


def load_hessian(path: str, key: str) -> torch.Tensor:
    """The Hessian ``key`` (float32 [n, n]) from the sidecar ``path`` (``check_sidecar`` it first);
    a damaged entry is a one-line error."""
    from quantkit.reader import SafetensorsFile
    hint = "calibrate again with --rounding gptq"
    with SafetensorsFile(path) as f:
        info = f.tensors.get(PREFIX + key)
        if info is None or info.dtype is not dtypes.F32 or len(info.shape) != 1:
            raise UnsupportedInputError("no packed F32 Hessian for this layer", path=path, tensor=PREFIX + key,
                                        hint=hint)
        try:
            features_of(info.shape[0])
        except ValueError:
            raise UnsupportedInputError(f"{info.shape[0]} values are no packed Hessian", path=path,
                                        tensor=PREFIX + key, hint=hint) from None
        packed = f.read_tensor(info).float()
    if not bool(torch.isfinite(packed).all()):
        raise UnsupportedInputError("the Hessian holds NaN/Inf", path=path, tensor=PREFIX + key, hint=hint)
    return unpack(packed)


class GPTQRounder:
    """``convert --rounding gptq``: the Hessian of each quantized tensor (the stats' sidecar, under the
    source's own names; a tensor ComfyUI's naming joins from parts whose layers share one input, as
    q/k/v do, takes that shared Hessian) and its GPTQ codes. Tensors it cannot round (no Hessian:
    per-sample projections, layers the inputs never reached, convolutions; NaN/Inf weights; a
    Hessian GPTQ cannot factor) round to nearest, each with the reason (``nearest``)."""

    def __init__(self, stats, source, *, act_order: bool = ACT_ORDER, percdamp: float = PERCDAMP):
        self.record = stats.hessians
        self.path = sidecar_of(stats.path, self.record)
        self.parts = getattr(source, "parts", None) or {}
        self.act_order, self.percdamp = act_order, percdamp
        self.rounded: list[str] = []
        self.nearest: dict[str, str] = {}
        self.dampings: dict[str, float] = {}
        check_sidecar(self.path, self.record)

    def key(self, name: str) -> str | None:
        pieces = self.parts.get(name) or [(name, 0, 0)]
        keys = {self.record["layers"].get(piece[0]) for piece in pieces}
        if len(keys) == 1 and None not in keys:
            return keys.pop()
        self.nearest[name] = "no Hessian" if keys == {None} else "its parts take different inputs"
        return None

    def round(self, name: str, key: str, weight: torch.Tensor, scale: torch.Tensor, granularity, fmt):
        """GPTQ codes of ``weight`` (float32 [out, in]) under the fixed ``scale``, or None (round to nearest)."""
        from quantkit.gptq import GPTQError, gptq_quantize
        if not bool(torch.isfinite(weight).all()):
            self.nearest[name] = "NaN/Inf in the weight"
            return None
        hessian = load_hessian(self.path, key)
        if tuple(hessian.shape) != (weight.shape[1],) * 2:
            raise UnsupportedInputError(f"Hessian of {hessian.shape[0]} inputs for a weight of {weight.shape[1]}",
                                        path=self.path, tensor=PREFIX + key,
                                        hint="calibrate this checkpoint again with --rounding gptq")
        try:
            codes = gptq_quantize(weight, hessian, scale, granularity, fmt, percdamp=self.percdamp,
                                  act_order=self.act_order)
        except GPTQError as exc:
            self.nearest[name] = exc.message
            return None
        self.rounded.append(name)
        return codes

    def merge(self, rounded: list[str], nearest: dict[str, str]) -> None:
        """Add what another process (a shard's worker) rounded how."""
        self.rounded.extend(n for n in rounded if n not in self.rounded)
        self.nearest.update(nearest)

    def describe(self) -> dict:
        """The manifest's record: the method, its settings, and what was rounded how."""
        return {"method": "gptq", "percdamp": self.percdamp, "block_size": GPTQ_BLOCK, "act_order": self.act_order,
                "hessians": self.record["file"], "hessians_id": self.record["id"], "gptq_tensors": len(self.rounded),
                "nearest_tensors": dict(sorted(self.nearest.items()))}


def check_sidecar(path: str, record: dict) -> None:
    """Before any work: the sidecar is there and is this calibration's (its id)."""
    from quantkit.reader import SafetensorsFile
    hint = "keep the sidecar beside its stats file, or calibrate again with --rounding gptq"
    if not os.path.isfile(path):
        raise UnsupportedInputError("the Hessian sidecar the stats file names is missing", path=path, hint=hint)
    with SafetensorsFile(path) as f:
        try:
            meta = parse_json(f.metadata.get(META_KEY, "null"), path)
        except JSONFileError:
            meta = None
    if not isinstance(meta, dict) or meta.get("id") != record.get("id") or meta.get("version") != VERSION:
        raise UnsupportedInputError("not the Hessian sidecar of this stats file (its id differs)", path=path,
                                    hint=hint)
