"""Worker processes: the independent pieces of one job (a conversion's output shards, its
source files' SHA256) run on every core.

The workers are forked, not spawned: they start at once, without importing torch again, and
inherit what the parent opened (the source) and computed (the plan). The parent forks them
before it starts any thread of its own. A worker ignores Ctrl-C and dies with its parent
(``PR_SET_PDEATHSIG`` on Linux, and a check of its parent's pid): a parent killed even by
SIGKILL leaves no worker writing behind it. When a piece fails, or the parent is interrupted,
every worker is killed before the error goes on, so the caller's clean-up (removing the
temporary folder the workers wrote into) runs after the last write. A count of jobs the user
types is capped at the cores, the free memory and the pieces of work (``cap_jobs``): a
``--jobs 100000`` forks no more workers than a ``--jobs`` at the machine's count.

    >>> results, peak = run_pieces(lambda n: n * n, [1, 2, 3], jobs=2)     # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Callable

JOB_BYTES = 512 << 20      # what one conversion job may take (measured ~270 MB: torch ~230 MB + buffers)

_work: Callable | None = None


def default_jobs() -> int:
    """As many jobs as the cores this process may use, and as fit in the memory available now;
    1 with 2 cores or fewer: one process keeps two cores busy already (its math on one, its
    hashes and writes on the other), so a second finds nothing to fill (measured on 2 cores,
    6 GB: convert --jobs 2 at 0.96-0.99x of --jobs 1, validate tied, at twice the memory)."""
    cores = _cores()
    if cores <= 2:
        return 1
    return min(cores, _jobs_in_memory(cores))


def cap_jobs(requested: int, pieces: int | None = None) -> tuple[int, str | None]:
    """``requested`` (a count the user typed) bounded by what the machine has: the pieces of
    work (None: not known yet), the cores this process may use and the jobs that fit in the
    memory available now (``JOB_BYTES`` each). Returns the jobs to run and, when capped, one
    line saying so (None otherwise).

        >>> cap_jobs(100000, pieces=3)                # doctest: +SKIP
        (2, '--jobs 100000 capped at 2: the machine has 2 cores')
    """
    cores, available = _cores(), available_memory() or 0
    limits = [(cores, f"the machine has {cores} core{'s' if cores != 1 else ''}"),
              (_jobs_in_memory(cores), f"the free memory ({available / 1e9:.1f} GB) holds no more "
                                       f"jobs at {JOB_BYTES / 1e9:.1f} GB each")]
    if pieces is not None:
        limits.append((max(pieces, 1), f"the work has {pieces} piece{'s' if pieces != 1 else ''}"))
    jobs, why = min(limits, key=lambda limit: limit[0])
    if requested <= jobs:
        return requested, None
    return jobs, f"--jobs {requested} capped at {jobs}: {why}"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _jobs_in_memory(cores: int) -> int:
    """Jobs that fit in the memory available now (at least 1); ``cores`` where it cannot be told."""
    available = available_memory()
    return cores if available is None else max(1, available // JOB_BYTES)


def available_memory() -> int | None:
    """The memory the kernel says is available now (MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_pieces(work: Callable, pieces: list, jobs: int, done: Callable | None = None) -> tuple[list, int]:
    """``[work(p) for p in pieces]``, in ``jobs`` forked processes; pieces start in list order
    (put the longest first). ``done(index, result)`` runs in the parent as each piece ends.

    No more than ``len(pieces)`` workers are forked.
    Returns the results in the order of ``pieces`` and the sum of the workers' peak RSS.
    ``work``'s exceptions are re-raised in the parent (the first to happen), after every worker
    was killed. Only where ``os.fork`` exists (Linux, macOS)."""
    global _work
    import multiprocessing
    if not pieces:
        return [], 0
    _work = work                    # the workers inherit it through fork: never pickled
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(pieces)), mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(os.getpid(),))
    results, peaks = [None] * len(pieces), {}
    try:
        with _signals_held():       # the first submit forks every worker
            futures = {pool.submit(_run_piece, p): i for i, p in enumerate(pieces)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                value, pid, peak = f.result()          # raises the worker's exception
                i = futures[f]
                results[i] = value
                peaks[pid] = max(peak, peaks.get(pid, 0))
                if done is not None:
                    done(i, value)
    except BaseException:
        _kill(pool)
        raise
    finally:
        _work = None
        pool.shutdown(wait=True, cancel_futures=True)
    return results, sum(peaks.values())


def _kill(pool: ProcessPoolExecutor) -> None:
    """SIGKILL every worker and reap it: nothing of theirs runs after this returns."""
    processes = list((getattr(pool, "_processes", None) or {}).values())   # the executor's own table
    for p in processes:
        try:
            p.kill()
        except (OSError, ValueError):
            pass
    for p in processes:
        try:
            p.join()
        except (OSError, ValueError, AssertionError):
            pass


_HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM held back (not lost) while the workers are forked: a worker starts with
    them blocked, until it has its own handlers and dies with its parent (``_start_worker``), and
    the parent's handler runs once every worker is in the pool's table, where ``_kill`` finds it
    (a signal landing inside ``fork`` itself left a worker the table did not hold). Forking at
    most one worker per core takes milliseconds: the signal waits no longer than that.

    Blocking the signals in this thread is not enough: the kernel hands a signal sent to the
    process to any thread that does not block it (torch's OpenMP threads), and Python then runs
    the handler in this thread at its next bytecode, possibly inside an at-fork hook (logging's
    ``_releaseLock``), where the exception it raises is printed and dropped. So the handlers only
    record the signal here, and it is raised again once the forks are done."""
    caught: list[int] = []
    previous = {}
    try:
        for s in _HELD:
            previous[s] = signal.signal(s, lambda signum, frame: caught.append(signum))
    except ValueError:              # not the main thread: handlers cannot be set, the mask still holds
        previous = {}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        for s, handler in previous.items():
            if handler is not None:     # None: a handler set outside Python, which cannot be put back
                signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def _start_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C reaches the whole group: the parent handles it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)     # the parent's handler unwinds; a worker just ends
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)             # PR_SET_PDEATHSIG: die with the parent
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:                        # the parent died before the line above
        os._exit(1)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)    # held since the fork (``_signals_held``)


def _run_piece(piece):
    import resource
    value = _work(piece)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return value, os.getpid(), peak
