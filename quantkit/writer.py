"""Write stage: a streaming safetensors writer.

Every output dtype and shape is known from the plan before any data is touched, so the
header is computed and written first, then tensors are streamed in header order. Bytes go to
a temporary file in the destination folder and the file is renamed into place only when every
byte was written, flushed and hashed: a run killed at any moment leaves nothing under the
final name. The SHA256 is computed from the very buffers that are written, on a thread of its
own, not in a pass after it (nor by reading the file back), and the writes themselves run on
another thread, with O_DIRECT where the filesystem takes it (``_Sink``).

The writer checks that its phases run in order (like gguf-py's WriterState): each tensor gets
exactly its byte count, in header order, and ``finish`` refuses an incomplete file.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import mmap
import os
import queue
import shutil
import threading
from dataclasses import dataclass
from typing import Callable

from .dtypes import DType
from .errors import OutputError

try:
    import fcntl
except ImportError:         # Windows: no O_DIRECT either
    fcntl = None

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

    A temp file whose writer process is still alive is left alone (``check_no_other_writer``
    refuses to write beside it). Returns what was removed.
    """
    removed = []
    for path in _temps(final_path):
        if _writer_pid(path) is not None:
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


def check_no_other_writer(final_path: str) -> None:
    """Refuse ``final_path`` while another live process writes it (its temporary file is there):
    two runs writing one path would both succeed, the later silently replacing the other's."""
    for path in _temps(final_path):
        pid = _writer_pid(path)
        if pid is not None:
            raise OutputError(f"another run (process {pid}) is writing it now", path=final_path,
                              hint=f"wait for it to finish or choose another path (if no such run is going on, "
                                   f"delete {path})")


def _temps(final_path: str) -> list[str]:
    head, tail = os.path.split(os.path.abspath(final_path))
    return glob.glob(os.path.join(glob.escape(head), f".{glob.escape(tail)}{TEMP_MARK}.*"))


def _writer_pid(temp: str) -> int | None:
    """The pid of the live process (not this one) writing the temporary file ``temp``, or None."""
    pid = temp.rsplit(".", 1)[-1]
    return int(pid) if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Sink:
    """The bytes of the file being written, in order, through page-aligned buffers: the caller
    copies (or computes) bytes into the current buffer; a full buffer goes to two threads at once,
    one writing it to the file, the other adding it to the SHA256. Both release the GIL (os.write,
    hashlib on large buffers), so the I/O and the hash overlap the caller's math; a buffer is
    reused once both are done with it (``BUFFERS`` of them in flight at most: the memory is fixed).

    The file is opened with O_DIRECT where the filesystem takes it: the buffers go to the device
    without a copy into the page cache. Buffered writes cost the kernel ~1-2.5 CPU-s per GB on the
    2-core machine (page allocation and reclaim: ``dd`` of 3.4 GB, 2.9-8.0 s of system time from
    run to run) against ~0.13 with O_DIRECT (see benchmarks/README.md). O_DIRECT needs aligned
    buffers, offsets and lengths: buffers are written in multiples of ``ALIGN`` (a few bytes over
    a buffer's end carry over to the next), the last one padded with zeros and the file cut back to
    its size. Where O_DIRECT is refused (some filesystems, systems without it) the same
    buffers go through ordinary writes. The hash is of the buffers, never of a read-back.
    """

    BUFFER_BYTES = 8 << 20
    BUFFERS = 4
    ALIGN = 4096

    def __init__(self, path: str, spare: int):
        self._fd = _open_exclusive(path)
        try:
            self._setup(spare)
        except BaseException:
            os.close(self._fd)
            raise

    def _setup(self, spare: int) -> None:
        self._direct = False
        if _O_DIRECT:
            try:
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | _O_DIRECT)
                self._direct = True
            except OSError:             # the filesystem does not take it
                pass
        # ``spare``: room past BUFFER_BYTES for the largest piece ``reserve`` hands out, plus a carry.
        size = self.BUFFER_BYTES + spare + self.ALIGN
        self._maps = [mmap.mmap(-1, size) for _ in range(self.BUFFERS)]
        self._views = [memoryview(m) for m in self._maps]
        self._holders = [0] * self.BUFFERS     # jobs (write, hash) not yet done with each buffer
        self._cond = threading.Condition()
        self._cur, self._fill = 0, 0
        self._sha = hashlib.sha256()
        self._error: BaseException | None = None
        self._closed = False
        self._queues = (queue.SimpleQueue(), queue.SimpleQueue())
        self._threads = [threading.Thread(target=self._serve, args=(q, job), name=name, daemon=True)
                         for q, job, name in zip(self._queues, (self._write_job, self._hash_job),
                                                 ("quantkit-write", "quantkit-sha256"))]
        for t in self._threads:
            t.start()

    def reserve(self, n: int) -> memoryview:
        """``n`` writable bytes at the end of what was written (``n`` at most the ``spare`` given);
        ``commit`` makes them part of the file."""
        return self._views[self._cur][self._fill:self._fill + n]

    def commit(self, n: int) -> None:
        self._fill += n
        if self._fill >= self.BUFFER_BYTES:
            self._hand_over()

    def write(self, data) -> None:
        src = memoryview(data).cast("B")
        while src:
            k = min(len(src), self.BUFFER_BYTES - self._fill)
            self._views[self._cur][self._fill:self._fill + k] = src[:k]
            src = src[k:]
            self.commit(k)

    def _hand_over(self) -> None:
        """The current buffer to the threads, all but its last ``fill % ALIGN`` bytes, which open the next."""
        if self._error is not None:
            raise self._error
        n = self._fill - self._fill % self.ALIGN
        nxt = (self._cur + 1) % self.BUFFERS
        self._wait_free(nxt)
        carry = self._fill - n
        self._views[nxt][:carry] = self._views[self._cur][n:self._fill]
        self._submit(self._cur, n, n)
        self._cur, self._fill = nxt, carry

    def _submit(self, i: int, hashed: int, written: int) -> None:
        with self._cond:
            self._holders[i] = 2
        self._queues[0].put((i, written))
        self._queues[1].put((i, hashed))

    def _wait_free(self, i: int) -> None:
        with self._cond:
            while self._holders[i]:
                self._cond.wait()

    def _serve(self, jobs: queue.SimpleQueue, job) -> None:
        while True:
            item = jobs.get()
            if item is None:
                return
            i, n = item
            try:
                if self._error is None:
                    job(self._views[i][:n])
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                self._error = self._error or exc
            finally:
                with self._cond:
                    self._holders[i] -= 1
                    self._cond.notify_all()

    def _hash_job(self, view: memoryview) -> None:
        self._sha.update(view)

    def _write_job(self, view: memoryview) -> None:
        while view:
            try:
                k = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno == errno.EINVAL and self._direct:     # O_DIRECT taken at open, refused here
                    self._buffered()
                    continue
                raise
            if k <= 0:
                raise OSError(errno.EIO, "the system wrote nothing")
            if k < len(view) and self._direct:     # the rest is no longer aligned
                self._buffered()
            view = view[k:]

    def _buffered(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self._direct = False

    def finish(self, size: int) -> str:
        """Write what is left, wait for both threads, cut the file to ``size`` bytes (the
        last buffer is padded for O_DIRECT) and fsync it; returns the SHA256."""
        if self._error is not None:
            raise self._error
        fill = self._fill
        written = fill
        if self._direct and fill % self.ALIGN:
            written = fill + self.ALIGN - fill % self.ALIGN
            self._views[self._cur][fill:written] = bytes(written - fill)
        self._submit(self._cur, fill, written)
        self._fill = 0
        for i in range(self.BUFFERS):
            self._wait_free(i)
        if self._error is not None:
            raise self._error
        if written != fill:
            os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        return self._sha.hexdigest()

    def close(self) -> None:
        """Stop the threads (after their current job) and close the file; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._error = self._error or _Stopped()
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        os.close(self._fd)
        # Dropped, not closed: a piece the caller got from ``reserve``, or an error's traceback,
        # may still point into a buffer; each map is unmapped with its last reference.
        self._views = self._maps = ()


class _Stopped(Exception):
    """The sink was closed: jobs still queued are skipped."""


_O_DIRECT = getattr(os, "O_DIRECT", 0) if fcntl is not None else 0


def _open_exclusive(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


class SafetensorsWriter:
    """Streams one safetensors file. Use as a context manager; call ``finish`` to publish.

    >>> with SafetensorsWriter("out.safetensors", specs, {"format": "pt"}) as w:   # doctest: +SKIP
    ...     w.write(b"...")       # bytes of specs[0], in one or more pieces, then specs[1] ...
    ...     sha256 = w.finish()
    """

    # Bytes ``reserve`` hands out at most (a quantized chunk is ~1 MiB; larger pieces are copied).
    RESERVE_BYTES = 4 << 20

    def __init__(self, final_path: str, tensors: list[OutputTensor], metadata: dict[str, str],
                 overwrite: bool = False):
        self.final_path = os.path.abspath(final_path)
        self.tensors = list(tensors)
        if os.path.exists(self.final_path) and not overwrite:
            raise OutputError("destination exists", path=final_path, hint="pass --overwrite to replace it")
        check_no_other_writer(self.final_path)
        self._existed = os.path.lexists(self.final_path)
        self.temp_path = temp_path_for(self.final_path)
        self._header = encode_header(self.tensors, metadata)
        self._index = 0                      # tensor being written
        self._left = self.tensors[0].nbytes if self.tensors else 0
        self._sink: _Sink | None = None
        self._created = False
        self.sha256: str | None = None
        self.bytes_written = 0

    def __enter__(self) -> "SafetensorsWriter":
        # __exit__ does not run when __enter__ raises, and a Ctrl-C / SIGTERM can land anywhere in
        # here, even between the file's creation and its result being stored: clean up here.
        try:
            try:
                self._created = True
                self._sink = _Sink(self.temp_path, self.RESERVE_BYTES)
            except OSError as exc:
                self._created = not isinstance(exc, FileExistsError)     # not ours to remove then
                raise OutputError(f"cannot create a temporary file in the destination folder: {exc.strerror}",
                                  path=self.temp_path, hint="check that the folder exists and is writable") from None
            self._raw_write(self._header)
            self._skip_empty()
        except BaseException:
            self.abort()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.sha256 is None:
            self.abort()

    def _io_error(self, exc: OSError, what: str = "write failed") -> OutputError:
        what = "disk full" if exc.errno == errno.ENOSPC else f"{what}: {exc.strerror}"
        return OutputError(f"{what} after {self.bytes_written} bytes", path=self.final_path,
                           hint="free space or choose another destination; nothing was left behind")

    def _raw_write(self, data) -> None:
        try:
            self._sink.write(data)
        except OSError as exc:
            raise self._io_error(exc) from None
        self.bytes_written += memoryview(data).nbytes

    def _skip_empty(self) -> None:
        while self._index < len(self.tensors) and self._left == 0:
            self._index += 1
            self._left = self.tensors[self._index].nbytes if self._index < len(self.tensors) else 0

    @property
    def current(self) -> OutputTensor | None:
        return self.tensors[self._index] if self._index < len(self.tensors) else None

    def _take(self, n: int) -> None:
        if self.current is None:
            raise ValueError(f"write of {n} bytes after the last tensor")
        if n > self._left:
            raise ValueError(f"{self.current.key}: {n} bytes written where {self._left} remain")

    def write(self, data) -> None:
        """Append bytes of the current tensor (a piece may not cross into the next tensor).

        ``data`` is any contiguous buffer (bytes, a numpy array); it is copied before this returns.
        """
        n = memoryview(data).nbytes
        self._take(n)
        self._raw_write(data)
        self._left -= n
        self._skip_empty()

    def reserve(self, n: int) -> memoryview | None:
        """``n`` writable bytes where the current tensor's next bytes go, to compute them in place
        (no copy); ``commit(n)`` once they are filled. None when ``n`` is over ``RESERVE_BYTES``:
        use ``write``."""
        self._take(n)
        return self._sink.reserve(n) if n <= self.RESERVE_BYTES else None

    def commit(self, n: int) -> None:
        self._take(n)
        try:
            self._sink.commit(n)
        except OSError as exc:
            raise self._io_error(exc) from None
        self.bytes_written += n
        self._left -= n
        self._skip_empty()

    def finish(self, before_publish: Callable[[str, int], None] | None = None) -> str:
        """Write the last bytes, fsync and rename into place; returns the file's SHA256 (hex).

        ``before_publish(sha256, bytes)`` runs just before the rename (to write a manifest
        that must exist whenever the file does); if it raises, nothing is published."""
        if self.current is not None:
            raise ValueError(f"finish() before all tensors were written (at {self.current.key})")
        try:
            digest = self._sink.finish(self.bytes_written)
        except OSError as exc:
            raise self._io_error(exc, "flush failed") from None
        self._sink.close()
        self._refuse_appeared()
        if before_publish is not None:
            before_publish(digest, self.bytes_written)
        if self._existed:
            os.replace(self.temp_path, self.final_path)
        else:
            _rename_new(self.temp_path, self.final_path)
        _fsync_dir(os.path.dirname(self.final_path))
        self.sha256 = digest
        return digest

    def _refuse_appeared(self) -> None:
        if not self._existed and os.path.lexists(self.final_path):
            raise _appeared(self.final_path)

    def abort(self) -> None:
        """Remove the temporary file; the final name is never touched."""
        if self._sink is not None:
            try:
                self._sink.close()
            except OSError:
                pass
        if not self._created:
            return
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
        check_no_other_writer(self.final_path)
        self._existed = os.path.lexists(self.final_path)
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
        """Replace the final folder (if any: --overwrite was checked by the caller) with this one;
        one that appeared since ``__enter__`` (another run wrote it) is refused, never replaced."""
        old = None
        if os.path.lexists(self.final_path) and not self._existed:
            raise _appeared(self.final_path)
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


def _appeared(path: str) -> OutputError:
    return OutputError("another run wrote this path while this one was writing it; it is left as that run "
                       "wrote it", path=path, hint="run again with another path, or with --overwrite to replace it")


def _rename_new(temp: str, final: str) -> None:
    """Rename ``temp`` to ``final``, which must not exist: a file another run put there meanwhile
    is refused, not replaced (a hard link fails where the name exists; where the file system
    takes no links, a plain rename right after ``_refuse_appeared``'s check)."""
    try:
        os.link(temp, final)
    except FileExistsError:
        raise _appeared(final) from None
    except OSError:
        os.replace(temp, final)
        return
    os.unlink(temp)


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
