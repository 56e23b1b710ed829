"""SHA256 of whole files, read sequentially on a background thread.

hashlib releases the GIL on large buffers, so a file hashes on the second core while the
main thread does the math.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading

READ_BYTES = 8 << 20


def sha256_file(path: str, chunk: int = READ_BYTES, cancelled: threading.Event | None = None) -> str | None:
    """SHA256 (hex) of a file; None if ``cancelled`` was set before the end."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if cancelled is not None and cancelled.is_set():
                return None
            h.update(view[:n])
    return h.hexdigest()


class BackgroundHash:
    """``sha256_file`` on a thread: ``start()`` now, ``result()`` when needed (re-raises errors)."""

    def __init__(self, path: str):
        self.path = path
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quantkit-hash", daemon=True)

    def _run(self) -> None:
        try:
            self._digest = sha256_file(self.path, cancelled=self._cancel)
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
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest


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
