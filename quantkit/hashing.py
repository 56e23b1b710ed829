"""SHA256 of whole files, read sequentially on a background thread.

hashlib releases the GIL on large buffers, so a file hashes on the second core while the
main thread does the math. Files are hashed through memory maps of a window at a time: the
page cache's pages themselves, where ``read`` would first copy them (measured 20 % less CPU
per byte hashed; the window, unmapped after, keeps the resident memory bounded).
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading

READ_BYTES = 8 << 20
WINDOW_BYTES = 16 << 20


def update_from_file(sha, fd: int, start: int, end: int, window: int = WINDOW_BYTES) -> None:
    """Feed bytes ``start..end`` of the open file ``fd`` to ``sha`` (they must exist)."""
    pos = start
    while pos < end:
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        n = min(window, end - base)
        m = mmap.mmap(fd, n, offset=base, access=mmap.ACCESS_READ)
        try:
            with memoryview(m) as view:
                sha.update(view[pos - base:])
        finally:
            m.close()
        pos = base + n


def sha256_file(path: str, chunk: int = READ_BYTES, cancelled: threading.Event | None = None) -> str | None:
    """SHA256 (hex) of a file; None if ``cancelled`` was set before the end."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size
        for pos in range(0, size, chunk):
            if cancelled is not None and cancelled.is_set():
                return None
            update_from_file(h, fd, pos, min(size, pos + chunk))
    finally:
        os.close(fd)
    return h.hexdigest()


def combined_digest(digests: dict[str, str]) -> str:
    """One SHA256 for a checkpoint of several files: that of its ``sha256sum``-style listing
    (``<sha256>  <file name>`` lines, sorted by name). One file: its own SHA256."""
    if len(digests) == 1:
        return next(iter(digests.values()))
    listing = "".join(f"{d}  {os.path.basename(p)}\n" for p, d in sorted(digests.items(), key=lambda e: os.path.basename(e[0])))
    return hashlib.sha256(listing.encode()).hexdigest()


class BackgroundHash:
    """``sha256_file`` of one file or several, in turn, on a thread: ``start()`` now,
    ``result()`` when needed (re-raises errors); ``digests`` then holds each file's."""

    def __init__(self, paths: str | list[str]):
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        self.digests: dict[str, str] = {}
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quantkit-hash", daemon=True)

    def _run(self) -> None:
        try:
            for path in self.paths:
                digest = sha256_file(path, cancelled=self._cancel)
                if digest is None:
                    return
                self.digests[path] = digest
        except BaseException as exc:  # noqa: BLE001 - handed to the caller in result()
            self._error = exc

    def start(self) -> "BackgroundHash":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop early (the work it was for failed); ``result`` is then meaningless."""
        self._cancel.set()

    def __enter__(self) -> "BackgroundHash":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.cancel()

    def result(self) -> str:
        """The file's SHA256 (several files: ``combined_digest``)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return combined_digest(self.digests)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch ops on ``n`` intra-op threads inside the block, then restore the setting.

    The SHA256 threads keep a core busy during conversion and validation: a second OpenMP
    worker then only competes with them, and every parallel op waits for whichever worker the
    scheduler put aside (measured up to 3-4x slower on a loaded 2-core machine).
    """
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- hashing what is read anyway

_WATCHED: dict[tuple[int, int], "_Follower"] = {}     # (st_dev, st_ino) -> its hash, while a ReadHashes is open
_BUSY = threading.Condition()     # guards every _Follower's jobs and pending buffers


def watching(ident: tuple[int, int]) -> "_Follower | None":
    """The hash fed by reads of the file ``ident`` (``(st_dev, st_ino)``), if one is open: readers
    call ``before(buffer)`` before filling a buffer and ``after(offset, buffer)`` once it is filled."""
    return _WATCHED.get(ident) if _WATCHED else None


class ReadHashes:
    """SHA256 of files that a reader walks anyway (validate's per-tensor pass), in one read: every
    buffer a ``SafetensorsFile`` fills from one of ``paths`` is hashed on that file's thread while
    the reader works on it, and the reader's next fill of the same memory waits for that hash.

    The file is hashed in order whatever the order of the reads: bytes the reads skip are hashed
    from a memory map as the next read passes them (and after the last read, the rest), bytes read
    twice once. ``eager`` files (nothing will read them) are hashed at once, like ``BackgroundHash``.
    Same interface as ``BackgroundHash``: ``result()`` and ``digests``.

    >>> with ReadHashes(["out.safetensors"]) as h:      # doctest: +SKIP
    ...     compare(...)                                # reads out.safetensors through SafetensorsFile
    ...     sha = h.result()
    """

    def __init__(self, paths: list[str], eager: bool = False):
        self.paths = list(paths)
        self.digests: dict[str, str] = {}
        self._followers = {}
        for path in self.paths:
            st = os.stat(path)
            self._followers[path] = _Follower(path, st.st_size, eager or not path.endswith(".safetensors"))
            self._followers[path].ident = (st.st_dev, st.st_ino)

    def __enter__(self) -> "ReadHashes":
        for f in self._followers.values():
            _WATCHED[f.ident] = f
            f.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._followers.values():
            if _WATCHED.get(f.ident) is f:
                del _WATCHED[f.ident]
            f.finish()

    def result(self) -> str:
        """Every file's SHA256 (in ``digests``); several files: ``combined_digest``."""
        for path, f in self._followers.items():
            if _WATCHED.get(f.ident) is f:
                del _WATCHED[f.ident]
            self.digests[path] = f.finish()
        return combined_digest(self.digests)


class _Follower:
    """One file's SHA256, fed by the buffers its reader fills (see ``ReadHashes``)."""

    def __init__(self, path: str, size: int, eager: bool):
        self.path, self.size, self.eager = path, size, eager
        self.ident = None
        self._busy = _BUSY
        self._pending: list[tuple[int, int]] = []      # address ranges of buffers not hashed yet
        self._jobs: list = []
        self._closed = False
        self._digest: str | None = None
        self._error: BaseException | None = None
        self.hashed_from_reads = 0        # bytes hashed straight from the reader's buffers
        self._thread = threading.Thread(target=self._run, name="quantkit-read-hash", daemon=True)

    def start(self) -> None:
        if self.eager:
            self._closed = True
        self._thread.start()

    @staticmethod
    def _span(view: memoryview) -> tuple[int, int]:
        import ctypes
        address = ctypes.addressof(ctypes.c_char.from_buffer(view)) if len(view) else 0
        return address, address + len(view)

    def before(self, view: memoryview) -> None:
        """Block until no buffer overlapping ``view``'s memory waits to be hashed (by any file)."""
        a, b = self._span(view)
        with self._busy:
            while any(x < b and a < y for f in _WATCHED.values() for x, y in f._pending):
                self._busy.wait()

    def after(self, offset: int, view: memoryview) -> None:
        with self._busy:
            if self._closed:
                return
            span = self._span(view)
            self._pending.append(span)
            self._jobs.append((offset, view, span))
            self._busy.notify_all()

    def finish(self) -> str | None:
        with self._busy:
            self._closed = True
            self._busy.notify_all()
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest

    def _run(self) -> None:
        sha, frontier = hashlib.sha256(), 0
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            self._error = exc
            return
        try:
            while True:
                with self._busy:
                    while not self._jobs and not self._closed:
                        self._busy.wait()
                    if not self._jobs:
                        break
                    offset, view, span = self._jobs.pop(0)
                try:
                    end = offset + len(view)
                    if offset > frontier:               # bytes no read brought: from the file
                        update_from_file(sha, fd, frontier, min(offset, self.size))
                        frontier = offset
                    if end > frontier:
                        sha.update(view[frontier - offset:])
                        self.hashed_from_reads += end - frontier
                        frontier = end
                finally:
                    with self._busy:
                        self._pending.remove(span)
                        self._busy.notify_all()
            update_from_file(sha, fd, frontier, self.size)
            self._digest = sha.hexdigest()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller in finish()
            self._error = exc
        finally:
            os.close(fd)
