"""Read stage for PyTorch pickles (``.ckpt .pt .pth .bin``): torch's safe loader only, then find the tensors.

A pickle can run any code while it loads, so it is only ever opened with
``torch.load(weights_only=True)``: torch's restricted unpickler accepts tensors, containers and
plain values and refuses every other global before calling it. A file that needs more is
refused with the reason; quantkit never retries with ``weights_only=False``.

Zip pickles (``torch.save`` since 1.6) are memory-mapped (``mmap=True``, private mapping), so
tensor bytes are paged in as they are read; old non-zip pickles cannot be mapped and load whole.

What comes out is a flat name -> tensor table: training wrappers (``state_dict``, ``model``,
``module``) are unwrapped, nested dicts flattened with dotted names, a common ``module.``
(DataParallel) prefix stripped, and everything that is not a tensor is listed in ``notes``.
An EMA copy kept beside the weights under its own key (``ema``, ``model_ema``,
``state_dict_ema``) is returned apart, in ``ema_tensors``.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
import warnings

from .dtypes import BY_TORCH_NAME
from .errors import UnsupportedInputError
from .reader import TensorInfo, TensorSource

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
RAW_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net")
EMA_WRAPPERS = ("ema", "model_ema", "ema_model", "state_dict_ema", "ema_state_dict")
MAX_DEPTH = 32   # nesting of dicts inside a state dict; real ones use 1-3
_RESAVE = ("re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or as safetensors "
           "in an environment you trust")


class PickleFile(TensorSource):
    """The tensors of a PyTorch pickle, loaded with ``weights_only=True``.

    >>> with PickleFile("model.ckpt") as f:                         # doctest: +SKIP
    ...     print(f.notes, list(f.tensors)[:3])
    """

    def __init__(self, path: str | os.PathLike):
        import torch
        self.path = os.fspath(path)
        self.metadata: dict[str, str] = {}
        self.notes: list[str] = []
        self._contiguous: tuple[str, object] | None = None
        obj, mapped = _safe_load(self.path)
        self._mappings = _file_mappings(self.path) if mapped and sys.platform.startswith("linux") else []
        raw, ema, ema_key = _unwrap(obj, self.path, self.notes)
        raw_tensors = self._tensor_table(raw, "")
        ema_tensors = self._tensor_table(ema, ema_key + ".") if ema is not None else {}
        self.ema_key = ema_key if ema is not None else None
        offset = 0
        self.tensors: dict[str, TensorInfo] = {}
        self.ema_tensors: dict[str, TensorInfo] = {}
        self._data: dict[int, torch.Tensor] = {}     # id(TensorInfo) -> tensor
        for table, infos in ((raw_tensors, self.tensors), (ema_tensors, self.ema_tensors)):
            for name, t in table.items():
                dtype = BY_TORCH_NAME[str(t.dtype).removeprefix("torch.")]
                info = TensorInfo(name, dtype, tuple(t.shape), offset, offset + t.numel() * dtype.itemsize)
                offset = info.end
                infos[name] = info
                self._data[id(info)] = t
        self.tensor_bytes = offset
        self._note_shared_storage()

    def _tensor_table(self, state: dict, where: str) -> dict:
        """Flatten, check and prefix-strip one state dict; non-tensors go to ``notes``."""
        tensors, ignored = {}, []
        _flatten(state, "", tensors, ignored, self.path, 0)
        for name, t in tensors.items():
            _check_tensor(name, t, self.path)
        if ignored:
            self.notes.append(f"pickle: {len(ignored)} non-tensor entries ignored"
                              f"{' in ' + where.rstrip('.') if where else ''}: {_summary(ignored)}")
        if tensors and all(n.startswith("module.") for n in tensors):
            tensors = {n[len("module."):]: t for n, t in tensors.items()}
            self.notes.append(f"pickle: common 'module.' prefix (DataParallel) stripped from {len(tensors)} names"
                              f"{' in ' + where.rstrip('.') if where else ''}")
        return tensors

    def _note_shared_storage(self) -> None:
        groups: dict[tuple, list[str]] = {}
        for info in self.tensors.values():
            t = self._data[id(info)]
            if t.numel():
                storage = t.untyped_storage()
                groups.setdefault((storage.data_ptr(), storage.nbytes()), []).append(info.name)
        shared = [names for names in groups.values() if len(names) > 1]
        if shared:
            pairs = "; ".join(" = ".join(names) for names in shared[:5])
            more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
            self.notes.append(f"pickle: {len(shared)} tied/shared tensor group(s) over one storage ({pairs}{more}): "
                              f"every name is kept with its own copy (safetensors has no aliasing)")

    def read_into(self, info: TensorInfo, byte_offset: int, out) -> None:
        """Copy the tensor's bytes from ``byte_offset`` into ``out`` (out of the mapped storage)."""
        import torch
        t = self._data.get(id(info))
        if t is None:
            raise KeyError(f"{info.name}: not a tensor of {self.path}")
        view = memoryview(out).cast("B")
        if byte_offset < 0 or byte_offset + len(view) > info.nbytes:
            raise ValueError("read past the end of the tensor")
        if not len(view):
            return
        mapped = t.is_contiguous()
        if not mapped:
            # A strided view (a saved transpose, a slice): made contiguous once and kept while
            # the caller walks this tensor's chunks, not once per chunk.
            if self._contiguous is None or self._contiguous[0] is not info:
                self._contiguous = (info, t.contiguous())
            t = self._contiguous[1]
        flat = t.reshape(-1).view(torch.uint8)
        torch.frombuffer(view, dtype=torch.uint8).copy_(flat[byte_offset: byte_offset + len(view)])
        if mapped and self._mappings:
            _page_out(flat.data_ptr() + byte_offset, len(view), self._mappings)

    def close(self) -> None:
        self._data.clear()
        self._contiguous = None


def _safe_load(path: str):
    """``torch.load`` with ``weights_only=True`` (mapped when the file is a zip), and whether it is
    mapped; every failure a QuantkitError."""
    import torch
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise UnsupportedInputError(f"cannot open: {exc.strerror}", path=path,
                                    hint="check the path and its permissions") from None
    if not magic:
        raise UnsupportedInputError("file is empty", path=path, hint="re-download or re-export the checkpoint")
    is_zip = magic == b"PK\x03\x04"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch's protocol/legacy-format chatter; the library never prints
            # A private mapping: even a caller that writes into a tensor never reaches the file.
            with torch.serialization.set_default_mmap_options(_map_private()):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip), is_zip
    except pickle.UnpicklingError as exc:
        reason = _refusal_reason(str(exc))
        called = re.search(r"GLOBAL (\S+)", reason)
        if called:
            raise UnsupportedInputError(
                f"this pickle needs code execution to load (it calls {called.group(1)}, which torch's safe loader "
                f"does not allow); quantkit loads pickles only with torch.load(weights_only=True) and never runs "
                f"code from a checkpoint", path=path, hint=f"if you trust its origin, {_RESAVE}") from None
        raise UnsupportedInputError(f"not a PyTorch checkpoint torch's safe loader can read ({reason})",
                                    path=path, hint=f"re-download it, or {_RESAVE}") from None
    except MemoryError:
        raise UnsupportedInputError("not enough memory to load this pickle", path=path,
                                    hint="old non-zip pickles load whole; " + _RESAVE) from None
    except Exception as exc:   # noqa: BLE001 - torch raises many types for corrupt input (EOFError, RuntimeError, ...)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        if "TorchScript" in first:
            raise UnsupportedInputError("a TorchScript archive, not a state dict; loading it would run its code",
                                        path=path, hint=f"export the weights: {_RESAVE}") from None
        what = "truncated or corrupt zip archive" if is_zip else "not a PyTorch checkpoint"
        raise UnsupportedInputError(f"{what} ({type(exc).__name__}: {first})", path=path,
                                    hint="re-download or re-export the checkpoint") from None


_MADV_DONTNEED = 4
_libc = None


def _file_mappings(path: str) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (from /proc/self/maps; [] elsewhere)."""
    real = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == real:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def _page_out(address: int, length: int, mappings: list[tuple[int, int]]) -> None:
    """Drop the mapped pages of a chunk just copied out, so a mapped pickle's resident memory
    stays at one chunk instead of growing to the file's size (pages read stay mapped, and
    counted, until the tensor is released). Only whole pages that lie inside a private,
    never-written mapping of the file itself (``mappings``): there DONTNEED just drops clean
    pages, which the next access reads again from the file. A no-op anywhere else."""
    global _libc
    import mmap
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + length) // page * page
    if end <= start or not any(lo <= start and end <= hi for lo, hi in mappings):
        return
    if _libc is None:
        import ctypes
        import ctypes.util
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _libc.madvise(start, end - start, _MADV_DONTNEED)


def _map_private() -> int:
    import mmap
    return getattr(mmap, "MAP_PRIVATE", 0)


def _refusal_reason(message: str) -> str:
    """The one useful line of torch's long weights_only message ('Unsupported global: GLOBAL posix.system ...')."""
    lines = [l.strip() for l in message.splitlines() if l.strip()]
    useful = [l for l in lines[1:] if not l.startswith(("Check the documentation", "Please file an issue"))]
    line = useful[-1] if useful else (lines[-1] if lines else "refused by the weights_only unpickler")
    return line.removeprefix("WeightsUnpickler error:").strip()[:200]


def _unwrap(obj, path: str, notes: list[str]):
    """Follow ``state_dict``/``model``/``module`` wrappers to the state dict; returns (raw, ema or None, ema key)."""
    if not isinstance(obj, dict):
        raise UnsupportedInputError(f"the pickle holds a {type(obj).__name__}, not a dict of tensors", path=path,
                                    hint=f"quantkit reads state dicts; {_RESAVE}")
    ema, ema_key, chain = None, "", []
    for _ in range(MAX_DEPTH):
        raw_key = next((k for k in RAW_WRAPPERS if isinstance(obj.get(k), dict)), None)
        e_key = next((k for k in EMA_WRAPPERS if isinstance(obj.get(k), dict)), None)
        if raw_key is None:
            if e_key is not None and not chain and not any(_is_tensor(v) for v in obj.values()):
                raw_key, e_key = e_key, None      # only an EMA copy: it is the state dict
            else:
                break
        if e_key is not None and ema is None:
            ema, ema_key = obj[e_key], e_key
        others = [(k, v) for k, v in obj.items() if k not in (raw_key, e_key)]
        if others:
            notes.append(f"pickle: {len(others)} non-tensor entries ignored: {_summary(others)}")
        chain.append(raw_key)
        obj = obj[raw_key]
    if chain:
        notes.append(f"pickle: weights found under {' -> '.join(repr(k) for k in chain)}")
    if ema is not None:
        for _ in range(MAX_DEPTH):
            inner = next((k for k in RAW_WRAPPERS if isinstance(ema.get(k), dict)), None)
            if inner is None:
                break
            ema = ema[inner]
    return obj, ema, ema_key


def _is_tensor(v) -> bool:
    import torch
    return isinstance(v, torch.Tensor)


def _flatten(d: dict, prefix: str, out: dict, ignored: list, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnsupportedInputError(f"dicts nested more than {MAX_DEPTH} deep under '{prefix}'", path=path,
                                    hint=_RESAVE)
    for key, value in d.items():
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            ignored.append((f"{prefix}{key!r}", value))
            continue
        name = f"{prefix}{key}"
        if _is_tensor(value):
            if name in out:
                raise UnsupportedInputError("two entries flatten to the same name", path=path, tensor=name,
                                            hint=_RESAVE)
            out[name] = value
        elif isinstance(value, dict) and any(_is_tensor(v) or isinstance(v, dict) for v in value.values()):
            _flatten(value, name + ".", out, ignored, path, depth + 1)
        else:
            ignored.append((name, value))


def _check_tensor(name: str, t, path: str) -> None:
    import torch
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise UnsupportedInputError(f"tensor subclass {type(t).__name__} is not supported", path=path, tensor=name,
                                    hint="save plain tensors")
    if t.layout is not torch.strided or t.is_quantized:
        raise UnsupportedInputError(f"{t.layout} tensors are not supported", path=path, tensor=name,
                                    hint="save dense tensors (tensor.to_dense())")
    if t.device.type != "cpu":
        raise UnsupportedInputError(f"tensor on device {t.device} has no data to read", path=path, tensor=name,
                                    hint="save real CPU tensors")
    code = str(t.dtype).removeprefix("torch.")
    if code not in BY_TORCH_NAME:
        raise UnsupportedInputError(f"dtype {t.dtype} is not supported (known: {', '.join(BY_TORCH_NAME)})",
                                    path=path, tensor=name, hint="quantkit reads only these dtypes")


def _summary(entries: list, limit: int = 6) -> str:
    """'epoch=3, global_step=1000, optimizer (dict)' for a note."""
    parts = []
    for key, value in entries[:limit]:
        if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 40):
            parts.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
        else:
            parts.append(f"{key} ({type(value).__name__})")
    more = f", and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(parts) + more
