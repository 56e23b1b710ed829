"""The ``quantkit`` command: a thin click shell over the library.

Nothing heavy is imported at module level, so ``quantkit --help`` answers without loading torch.
Exit codes: 0 success, 1 validation failed, 2 bad input or usage (out of memory included), 3 an
internal error (a bug: its traceback is printed), 130 / 143 Ctrl-C / SIGTERM.

The package: ``group`` (the group, how a command ends: the one place a library error becomes its
exit code), ``options`` (each shared option declared once), ``render`` (what the commands print),
and the commands by stage: ``convert`` (convert, plan, presets, formats), ``check`` (validate,
sensitivity, check-math), ``calibrate`` (calibrate, stats show), ``release`` (publish, verify).
"""
from __future__ import annotations

import os
import sys

from . import calibrate, check, convert, release  # noqa: F401  (each registers its commands with main)
from .group import INTERNAL_ERROR, Terminated, _fail, _Group, _terminate, main  # noqa: F401

__all__ = ["main", "run"]


def run() -> None:
    """Console entry point: SIGTERM unwinds like Ctrl-C (see _Group); lines reach a pipe as they
    are printed (the header before the work, not at the end); a reader that goes away (``| head``)
    silences the rest of the output without changing the exit status.

    The command's work is done (files written, fsynced and renamed, reports flushed) when ``main``
    returns, so the process ends at once with its status, without the interpreter's teardown:
    that tears torch's operator libraries down one by one, ~0.5 s of every command that imported
    torch (``python -c "import quantkit.quantize, quantkit.validation"``: 1.68-1.88 s, 1.15-1.30 s
    ending with ``os._exit``)."""
    import signal
    signal.signal(signal.SIGTERM, _terminate)
    sys.meta_path.insert(0, _NumpyBeforeTorch())
    sys.stdout = _PipeSafe(sys.stdout)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):           # sys.exit("message"): what the interpreter would do
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class _NumpyBeforeTorch:
    """Imports numpy (from Python) right before torch is first imported. torch's C start-up imports
    numpy itself and clears whatever error that import raised: a Ctrl-C or SIGTERM landing then
    (the ``Terminated`` of ``_terminate``) was lost, and the command ran to its end (measured: 3
    SIGTERMs of 25 sent during calibrate's start-up, exit 0 seconds later). Imported first, numpy's
    import lets the exception through, and torch finds it loaded."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            import numpy  # noqa: F401
        return None


class _PipeSafe:
    """stdout, line-buffered, that turns into /dev/null when its reader closes the pipe."""

    def __init__(self, stream):
        self._stream = stream
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._silence()

    def _silence(self):
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())     # the interpreter's last flush at exit goes nowhere too
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


