"""Write stage: a streaming safetensors writer.

Every output dtype and shape is known from the plan before any data is touched, so the
header is computed and written first, then tensors are streamed in header order. Bytes go to
a temporary file in the destination folder and the file is renamed into place only when every
byte was written, flushed and hashed: a run killed at any moment leaves nothing under the
final name. The SHA256 is computed while writing (a thread reads back what was written, from
the page cache), not in a pass after it. A header may hold placeholders for values still being
computed (the source's SHA256): it is rewritten in place when they are known, before the hash
thread starts, so the data never waits for them.

The writer checks that its phases run in order (like gguf-py's WriterState): each tensor gets
exactly its byte count, in header order, and ``finish`` refuses an incomplete file.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import threading
import shutil
from dataclasses import dataclass
from typing import Callable

from .dtypes import DType
from .errors import OutputError
from .hashing import update_from_file

TEMP_MARK = ".quantkit-partial"
_ALIGN = 8  # safetensors pads the header with spaces so the data section starts 8-aligned


@dataclass(frozen=True)
class OutputTensor:
    key: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def encode_header(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus the JSON header, space-padded to 8-byte alignment."""
    doc: dict = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    offset = 0
    for t in tensors:
        if t.key in doc or t.key == "__metadata__":
            raise ValueError(f"duplicate output key {t.key!r}")
        doc[t.key] = {"dtype": t.dtype.code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % _ALIGN)
    return len(body).to_bytes(8, "little") + body


def temp_path_for(final_path: str) -> str:
    head, tail = os.path.split(os.path.abspath(final_path))
    return os.path.join(head, f".{tail}{TEMP_MARK}.{os.getpid()}")


def remove_stale_temps(final_path: str) -> list[str]:
    """Delete temporary files that earlier runs (killed, crashed) left for ``final_path``.

    A temp file whose writer process is still alive is left alone. Returns what was removed.
    """
    head, tail = os.path.split(os.path.abspath(final_path))
    removed = []
    for path in glob.glob(os.path.join(glob.escape(head), f".{glob.escape(tail)}{TEMP_MARK}.*")):
        pid = path.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _FollowingHash:
    """SHA256 of the file being written, on a second thread: hashlib releases the GIL, so the
    hash overlaps the math.

    It hashes the header, then reads back (from the page cache) every byte the writer has
    written so far, until the writer is done: the writer hands a piece to the kernel and goes
    on, never waiting for the hash.
    """

    READ_BYTES = 4 << 20

    def __init__(self, path: str, header: bytes):
        self._path = path
        self._header = header
        self._cond = threading.Condition()
        self._written = 0            # bytes the writer has handed to the kernel
        self._closed = False         # the writer wrote its last byte
        self._stopped = False        # abandoned: stop, never touch the file again
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="quantkit-sha256", daemon=True)
        self._thread.start()

    def advance(self, written: int) -> None:
        with self._cond:
            self._written = written
            self._cond.notify()

    def _run(self) -> None:
        try:
            self._digest = self._hash_following(self._header)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer in result()
            self._error = exc

    def _hash_following(self, header: bytes) -> str | None:
        sha = hashlib.sha256(header)
        pos = len(header)
        fd = os.open(self._path, os.O_RDONLY)
        try:
            while True:
                with self._cond:
                    # a few MiB at a time: fewer maps and wake-ups than one per piece written
                    while self._written - pos < self.READ_BYTES and not self._closed and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return None
                    end, last = self._written, self._closed
                # The pages just written, mapped from the page cache (no copy); the writer only
                # appends to this file, so every byte below ``end`` exists.
                update_from_file(sha, fd, pos, end)
                pos = end
                if last:
                    return sha.hexdigest()
        finally:
            os.close(fd)

    def result(self, written: int) -> str:
        """The file's SHA256 once its last byte (``written`` in all) is written."""
        with self._cond:
            self._written, self._closed = written, True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest

    def abandon(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()


class SafetensorsWriter:
    """Streams one safetensors file. Use as a context manager; call ``finish`` to publish.

    >>> with SafetensorsWriter("out.safetensors", specs, {"format": "pt"}) as w:   # doctest: +SKIP
    ...     w.write(b"...")       # bytes of specs[0], in one or more pieces, then specs[1] ...
    ...     sha256 = w.finish()
    """

    def __init__(self, final_path: str, tensors: list[OutputTensor], metadata: dict[str, str],
                 overwrite: bool = False):
        self.final_path = os.path.abspath(final_path)
        self.tensors = list(tensors)
        if os.path.exists(self.final_path) and not overwrite:
            raise OutputError("destination exists", path=final_path, hint="pass --overwrite to replace it")
        self.temp_path = temp_path_for(self.final_path)
        self._header = encode_header(self.tensors, metadata)
        self._index = 0                      # tensor being written
        self._left = self.tensors[0].nbytes if self.tensors else 0
        self._file = None
        self._hasher = None
        self.sha256: str | None = None
        self.bytes_written = 0

    def __enter__(self) -> "SafetensorsWriter":
        # __exit__ does not run when __enter__ raises, and a Ctrl-C / SIGTERM can land anywhere in
        # here, even between open() creating the file and its result being stored: clean up here.
        try:
            try:
                # Unbuffered: pieces are large, and the hash thread reads back what was written.
                self._file = open(self.temp_path, "xb", buffering=0)
            except OSError as exc:
                raise OutputError(f"cannot create a temporary file in the destination folder: {exc.strerror}",
                                  path=self.temp_path, hint="check that the folder exists and is writable") from None
            self._raw_write(self._header)
            self._hasher = _FollowingHash(self.temp_path, self._header)
            self._hasher.advance(self.bytes_written)
            self._skip_empty()
        except BaseException:
            self.abort()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.sha256 is None:
            self.abort()

    def _raw_write(self, data) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        try:
            while view:
                view = view[self._file.write(view):]
        except OSError as exc:
            what = "disk full" if exc.errno == errno.ENOSPC else f"write failed: {exc.strerror}"
            raise OutputError(f"{what} after {self.bytes_written} bytes", path=self.final_path,
                              hint="free space or choose another destination; nothing was left behind") from None
        self.bytes_written += n
        if self._hasher is not None:
            self._hasher.advance(self.bytes_written)

    def _skip_empty(self) -> None:
        while self._index < len(self.tensors) and self._left == 0:
            self._index += 1
            self._left = self.tensors[self._index].nbytes if self._index < len(self.tensors) else 0

    @property
    def current(self) -> OutputTensor | None:
        return self.tensors[self._index] if self._index < len(self.tensors) else None

    def write(self, data) -> None:
        """Append bytes of the current tensor (a piece may not cross into the next tensor).

        ``data`` is any contiguous buffer (bytes, a numpy array); it is written before this returns.
        """
        n = memoryview(data).nbytes
        if self.current is None:
            raise ValueError(f"write of {n} bytes after the last tensor")
        if n > self._left:
            raise ValueError(f"{self.current.key}: {n} bytes written where {self._left} remain")
        self._raw_write(data)
        self._left -= n
        self._skip_empty()

    def finish(self, before_publish: Callable[[str, int], None] | None = None) -> str:
        """Flush, fsync and rename into place; returns the file's SHA256 (hex).

        ``before_publish(sha256, bytes)`` runs just before the rename (to write a manifest
        that must exist whenever the file does); if it raises, nothing is published."""
        if self.current is not None:
            raise ValueError(f"finish() before all tensors were written (at {self.current.key})")
        try:
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise OutputError(f"flush failed: {exc.strerror}", path=self.final_path,
                              hint="free space or choose another destination") from None
        digest = self._hasher.result(self.bytes_written)
        self._file.close()
        if before_publish is not None:
            before_publish(digest, self.bytes_written)
        os.replace(self.temp_path, self.final_path)
        _fsync_dir(os.path.dirname(self.final_path))
        self.sha256 = digest
        return digest

    def abort(self) -> None:
        """Remove the temporary file; the final name is never touched."""
        if self._hasher is not None:
            self._hasher.abandon()
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except OSError:
                pass
        try:
            os.unlink(self.temp_path)
        except OSError:         # never created, or not ours to remove: the error that led here matters
            pass


class TempFolder:
    """A folder output built under a temporary name and renamed into place by ``commit``.

    Killed or failed before ``commit``, nothing exists under the final name (the temporary
    folder is removed, or recognised and removed by the next run).
    """

    def __init__(self, final_path: str):
        self.final_path = os.path.abspath(final_path)
        self.path = temp_path_for(self.final_path)
        self._committed = False

    def __enter__(self) -> "TempFolder":
        try:
            os.mkdir(self.path)
        except OSError as exc:
            raise OutputError(f"cannot create a temporary folder: {exc.strerror}", path=self.path,
                              hint="check that the destination's parent exists and is writable") from None
        except BaseException:       # Ctrl-C / SIGTERM as mkdir returned: __exit__ will not run
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        return self

    def commit(self) -> None:
        """Replace the final folder (if any: --overwrite was checked by the caller) with this one."""
        old = None
        if os.path.lexists(self.final_path):
            old = self.path + ".old"
            os.rename(self.final_path, old)
        os.rename(self.path, self.final_path)
        _fsync_dir(os.path.dirname(self.final_path))
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> str:
    """Write a small file (a manifest, a config) through a temp file and rename; returns its SHA256."""
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:        # an I/O error, or Ctrl-C / SIGTERM: no temporary file stays
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write: {exc.strerror}", path=path,
                              hint="free space or check permissions") from None
        raise
    return hashlib.sha256(data).hexdigest()
