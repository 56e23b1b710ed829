"""Read stage: parse and validate a safetensors header, then stream tensor bytes.

The header is untrusted input. It is parsed here once, with hard limits, before any
conversion starts: size cap, UTF-8 JSON object, no duplicate keys, known dtypes, shapes of
non-negative ints, byte sizes computed with Python ints, offsets contiguous from 0 with no
gap or overlap and ending exactly at the end of the file.

Tensor data is never read whole: ``read_into`` copies a byte range into a caller-owned buffer
with ``os.preadv``, and ``iter_rows`` maps one chunk of the file at a time (``map_bytes``),
each unmapped once the caller moves on to the next, so resident memory stays at a few chunks
however large the file is. A chunk that is only read (reduced, widened, hashed) is then never
copied at all: the page cache's pages are the tensor (measured: an absmax pass over 4.4 GB, 0.30
CPU-s mapped against 0.68-0.86 copied with preadv).

``TensorSource`` is what the pipeline reads from: ``SafetensorsFile`` here, and
``quantkit.checkpoint.Checkpoint`` for every other layout (shards, folders, pickles).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
from dataclasses import dataclass

from .dtypes import BY_CODE, DType
from .errors import HeaderError, UnsupportedInputError

MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own cap
MAX_DIM = 2 ** 62                # any single dimension past this is absurd
MAX_TENSOR_BYTES = 2 ** 50       # 1 PiB: products that overflow 64 bits are caught long before


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise HeaderError(f"duplicate key '{key}' in the header")
        seen[key] = value
    return seen


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_header(raw: bytes, data_len: int, path: str) -> tuple[dict[str, str], list[TensorInfo]]:
    """Validate a header's JSON bytes against a data section of ``data_len`` bytes.

    Returns the ``__metadata__`` mapping and the tensors in file order.
    """
    hint = "the file is not a valid safetensors checkpoint; re-download or re-export it"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"header is not UTF-8 (byte {exc.start})", path=path, hint=hint) from None
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except HeaderError as exc:
        raise HeaderError(exc.message, path=path, hint=hint) from None
    except (ValueError, RecursionError) as exc:
        raise HeaderError(f"header is not valid JSON ({exc})", path=path, hint=hint) from None
    if not isinstance(doc, dict):
        raise HeaderError(f"header is a JSON {type(doc).__name__}, not an object", path=path, hint=hint)

    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise HeaderError("__metadata__ must map strings to strings", path=path, hint=hint)

    infos = []
    for name, entry in doc.items():
        infos.append(_parse_entry(name, entry, path, hint))
    infos.sort(key=lambda t: (t.start, t.end))

    expected = 0
    for t in infos:
        if t.start != expected:
            what = "overlaps the previous tensor" if t.start < expected else f"leaves a gap of {t.start - expected} bytes"
            raise HeaderError(f"data_offsets {t.start}..{t.end} {what}", path=path, tensor=t.name, hint=hint)
        expected = t.end
    if expected != data_len:
        what = "past the end of the file" if expected > data_len else f"short of the file's end by {data_len - expected} bytes"
        detail = "the file is truncated" if expected > data_len else "trailing bytes are not described by the header"
        raise HeaderError(f"tensor data ends at byte {expected} of the data section, {what} ({data_len} bytes): {detail}",
                          path=path, hint=hint)

    base = 8 + len(raw)
    return metadata, [TensorInfo(t.name, t.dtype, t.shape, t.start + base, t.end + base) for t in infos]


def _parse_entry(name: str, entry, path: str, hint: str) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise HeaderError("entry must be an object with exactly dtype, shape and data_offsets",
                          path=path, tensor=name, hint=hint)
    code = entry["dtype"]
    dtype = BY_CODE.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise HeaderError(f"unknown dtype {code!r} (known: {', '.join(BY_CODE)})", path=path, tensor=name,
                          hint="quantkit reads only these dtypes")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise HeaderError(f"shape {shape!r} is not a list of non-negative integers", path=path, tensor=name, hint=hint)
    offsets = entry["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise HeaderError(f"data_offsets {offsets!r} must be two increasing non-negative integers",
                          path=path, tensor=name, hint=hint)
    nbytes = math.prod(shape) * dtype.itemsize    # Python ints: no overflow
    if nbytes > MAX_TENSOR_BYTES:
        raise HeaderError(f"shape {shape} describes {nbytes} bytes, beyond any real checkpoint",
                          path=path, tensor=name, hint=hint)
    if offsets[1] - offsets[0] != nbytes:
        raise HeaderError(f"shape {shape} x {code} is {nbytes} bytes but data_offsets span {offsets[1] - offsets[0]}",
                          path=path, tensor=name, hint=hint)
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


MADV_POPULATE_READ = 22     # Linux 5.14+: fault a mapping's pages in now (Python's mmap does not name it)


def _populate(m: mmap.mmap) -> None:
    """Read ``m``'s pages and map them now; where the kernel cannot (before 5.14), ask for them to be
    read ahead (MADV_WILLNEED) and leave the mapping to the first touch."""
    try:
        if not sys.platform.startswith("linux"):      # the number means nothing (or something else) elsewhere
            raise OSError("MADV_POPULATE_READ is Linux's")
        m.madvise(MADV_POPULATE_READ)
    except (OSError, ValueError, AttributeError):
        try:
            m.madvise(mmap.MADV_WILLNEED)
        except (OSError, ValueError, AttributeError):
            pass


def chunk_rows(info: TensorInfo, chunk_bytes: int, align: int = 1) -> int:
    """Rows of ``info`` per chunk of about ``chunk_bytes``: a multiple of ``align``, at least ``align``."""
    rows = info.shape[0] if info.shape else 1
    row_bytes = info.nbytes // rows if rows else 0
    return max(align, (chunk_bytes // max(row_bytes, 1)) // align * align)


class TensorSource:
    """Anything the pipeline reads tensors from: a name -> TensorInfo table and ``read_into``.

    Subclasses set ``path``, ``tensors`` and ``metadata`` and implement ``read_into``; the
    chunked readers below are built on it alone.
    """

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    renamed: str | None = None      # whose names the tensors are presented under (None: the file's own)

    def read_into(self, info: TensorInfo, byte_offset: int, out) -> None:
        """Fill the writable buffer ``out`` (memoryview-able) with the tensor's bytes from ``byte_offset``."""
        raise NotImplementedError

    def iter_rows(self, info: TensorInfo, chunk_bytes: int, align: int = 1, rows_per_chunk: int | None = None):
        """Yield ``(row_start, row_end, tensor)`` over a tensor's first dimension, a chunk at a time.

        Each chunk holds a multiple of ``align`` rows (the last may be short) and about
        ``chunk_bytes`` bytes; the tensor is a view into a buffer reused for the next chunk.
        A 0-d tensor is one row of one element. ``rows_per_chunk`` fixes the chunking (to walk
        two tensors of the same shape in step).
        """
        import torch
        rows = info.shape[0] if info.shape else 1
        if rows == 0 or info.nbytes == 0:
            return
        row_bytes = info.nbytes // rows
        per_chunk = rows_per_chunk or chunk_rows(info, chunk_bytes, align)
        buf = None
        inner = info.shape[1:] if info.shape else ()
        for r0 in range(0, rows, per_chunk):
            r1 = min(rows, r0 + per_chunk)
            n = (r1 - r0) * row_bytes
            raw = self.map_bytes(info, r0 * row_bytes, n)
            if raw is None:
                if buf is None:
                    buf = torch.empty(min(rows, per_chunk) * row_bytes, dtype=torch.uint8)
                raw = buf[:n]
                self.read_into(info, r0 * row_bytes, raw.numpy())
            yield r0, r1, raw.view(info.dtype.torch).reshape((r1 - r0, *inner))
            raw = None      # the chunk's mapping goes with the caller's last reference to it

    def map_bytes(self, info: TensorInfo, byte_offset: int, nbytes: int, populate: bool = False):
        """``nbytes`` of the tensor from ``byte_offset`` as a uint8 tensor over a private mapping of
        the file (no copy; writes to it stay in this process), or None where the source cannot map
        (the caller then reads with ``read_into``). ``populate``: the pages are read and mapped now,
        by the calling thread (a prefetching one), not on first touch by the thread computing."""
        return None

    def read_tensor(self, info: TensorInfo):
        """A small tensor whole (scales, markers). Never used for weights."""
        import torch
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self.read_into(info, 0, buf.numpy())
        return buf.view(info.dtype.torch).reshape(info.shape)

    def iter_bytes(self, info: TensorInfo, chunk_bytes: int, buffer=None):
        """Yield a tensor's raw bytes in pieces of at most ``chunk_bytes`` (whole elements).

        With ``buffer`` (a writable uint8 buffer of at least ``chunk_bytes``) the pieces are views
        of it, overwritten by the next piece; without, each piece is fresh ``bytes``."""
        step = max(info.dtype.itemsize, chunk_bytes // info.dtype.itemsize * info.dtype.itemsize)
        for b0 in range(0, info.nbytes, step):
            n = min(step, info.nbytes - b0)
            if buffer is None:
                out = bytearray(n)
                self.read_into(info, b0, out)
                yield bytes(out)
            else:
                out = memoryview(buffer).cast("B")[:n]
                self.read_into(info, b0, out)
                yield out

    def close(self) -> None:
        """Release what the source holds open (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsFile(TensorSource):
    """A validated safetensors file opened read-only.

    >>> with SafetensorsFile("model.safetensors") as f:          # doctest: +SKIP
    ...     for info in f.tensors.values(): print(info.name, info.shape)
    """

    def __init__(self, path: str | os.PathLike):
        if sys.byteorder != "little":
            raise UnsupportedInputError("safetensors data is little-endian; this machine is big-endian")
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise UnsupportedInputError(f"cannot open: {exc.strerror}", path=self.path,
                                        hint="check the path and its permissions") from None
        try:
            self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse(self) -> None:
        hint = "the file is not a valid safetensors checkpoint; re-download or re-export it"
        st = os.fstat(self._fd)
        if not (st.st_mode & 0o170000) == 0o100000:
            raise UnsupportedInputError("not a regular file", path=self.path, hint="pass a .safetensors file")
        self.file_size = st.st_size
        if self.file_size < 8:
            raise HeaderError(f"file is {self.file_size} bytes, too short for a safetensors header",
                              path=self.path, hint=hint)
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > MAX_HEADER_BYTES:
            raise HeaderError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap", path=self.path, hint=hint)
        if 8 + n > self.file_size:
            raise HeaderError(f"header length {n} runs past the end of the {self.file_size}-byte file",
                              path=self.path, hint="the file is truncated; re-download it")
        raw = self._pread_exact(n, 8)
        self._mappable = True
        self.header_size = n
        self.metadata, infos = parse_header(raw, self.file_size - 8 - n, self.path)
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}

    def _pread_exact(self, n: int, offset: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            b = os.pread(self._fd, n - got, offset + got)
            if not b:
                raise HeaderError(f"file ended at byte {offset + got} while {n - got} more bytes were expected",
                                  path=self.path, hint="the file changed or is truncated")
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    def read_into(self, info: TensorInfo, byte_offset: int, out) -> None:
        """Fill the writable buffer ``out`` (memoryview-able) with the tensor's bytes from ``byte_offset``."""
        view = memoryview(out).cast("B")
        pos = info.start + byte_offset
        if byte_offset < 0 or pos + len(view) > info.end:
            raise ValueError("read past the end of the tensor")
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], pos + done)
            if n == 0:
                raise HeaderError(f"file ended at byte {pos + done}", path=self.path, tensor=info.name,
                                  hint="the file changed or is truncated")
            done += n

    def map_bytes(self, info: TensorInfo, byte_offset: int, nbytes: int, populate: bool = False):
        import torch
        pos = info.start + byte_offset
        if byte_offset < 0 or nbytes <= 0 or pos + nbytes > info.end:
            raise ValueError("map past the end of the tensor")
        if not self._mappable:
            return None
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        # A mapped page past the file's end kills the process (SIGBUS): a file cut short since it
        # was opened is an error here instead (the window between check and read is microseconds).
        size = os.fstat(self._fd).st_size
        if size < pos + nbytes:
            raise HeaderError(f"the file is now {size} bytes, it ended before byte {pos + nbytes}", path=self.path,
                              tensor=info.name, hint="the file changed or is truncated; let the program writing it finish")
        try:
            m = mmap.mmap(self._fd, pos + nbytes - base, offset=base, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):       # a filesystem that cannot map (some FUSE, special files): read
            self._mappable = False
            return None
        if populate:
            _populate(m)
        return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=pos - base)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
