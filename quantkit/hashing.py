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

from .errors import UnsupportedInputError

READ_BYTES = 8 << 20
WINDOW_BYTES = 16 << 20


def update_from_file(sha, fd: int, start: int, end: int, window: int = WINDOW_BYTES) -> None:
    """Feed bytes ``start..end`` of the open file ``fd`` to ``sha`` (they must exist).

    A page of a mapping past the end of the file kills the process (SIGBUS), so the file's size
    is checked before each window is mapped: a file cut short meanwhile raises
    ``UnsupportedInputError`` instead. (The window between the check and the read remains, microseconds wide.)"""
    pos = start
    while pos < end:
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        n = min(window, end - base)
        if os.fstat(fd).st_size < base + n:
            raise UnsupportedInputError(f"the file shrank to {os.fstat(fd).st_size} bytes while it was read ({base + n}"
                                        " expected): another program truncated or rewrote it",
                                        hint="let that program finish, then run quantkit again")
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
    except UnsupportedInputError as exc:
        exc.path = exc.path or path
        raise
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
