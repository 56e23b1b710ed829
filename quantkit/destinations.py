"""Every path quantkit writes is checked before any work, by the same rules.

An output (a checkpoint, a folder) and a report (``--json``) may never be the source or any file
it reads, never the output or a file inside it, never its manifest; their folder must exist, and
an existing file is replaced only with ``--overwrite``. A refusal is one ``OutputError`` line:
nothing has been read past the headers, and nothing is written.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from .errors import OutputError
from .manifest import FOLDER_MANIFEST, manifest_path


def check_destination(src: str, dst: str, overwrite: bool, folder: bool = False) -> None:
    """The destination may not be the source (also through links or '..'); an existing one needs overwrite."""
    if not dst:
        raise OutputError("no output path given", hint="give a file name such as model-fp8.safetensors")
    _refuse_special(dst, "destination")
    if os.path.realpath(src) == os.path.realpath(dst) or (
            os.path.exists(dst) and os.path.samefile(src, dst)):
        raise OutputError("destination is the source", path=dst, hint="choose another output path")
    if folder and os.path.realpath(os.path.dirname(os.path.abspath(src))) == os.path.realpath(dst):
        raise OutputError("destination is the source's folder", path=dst, hint="choose a new folder")
    if not folder and os.path.isdir(dst):
        raise OutputError("destination is a folder", path=dst, hint="give a file name ending in .safetensors")
    if folder and os.path.exists(dst) and not os.path.isdir(dst):
        raise OutputError("destination is a file but this output is a folder", path=dst,
                          hint="give a folder name")
    if os.path.exists(dst) and not overwrite:
        raise OutputError("destination exists", path=dst, hint="pass --overwrite to replace it")
    if folder and os.path.isdir(dst) and os.listdir(dst) and not os.path.isfile(os.path.join(dst, FOLDER_MANIFEST)):
        # --overwrite replaces a whole folder: only one quantkit wrote (it holds quantkit.json), or an empty one
        raise OutputError("destination is a folder quantkit did not write; --overwrite would delete its files",
                          path=dst, hint="give a new folder name")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise OutputError("destination folder does not exist", path=parent, hint="create it first")
    check_writable(parent, "destination")


def check_not_source_files(source, dst: str) -> None:
    """Replacing ``dst`` may not touch any file the source reads (a shard, a folder holding them)."""
    real = os.path.realpath(dst)
    for f in source_reads(source):
        if _inside(os.path.realpath(f), real) and os.path.exists(f):
            raise OutputError("destination holds a file the source is read from", path=dst,
                              hint=f"choose an output path that does not contain {f}")


def source_reads(source) -> list[str]:
    """The files reading ``source`` (an opened checkpoint) touches: its weights and the model
    config beside them (read by folder formats and ``--model-output``)."""
    folders = {os.path.dirname(os.path.abspath(f)) for f in source.files}
    given = [source.path] if os.path.isfile(source.path) else []       # an index, a pickle, the file itself
    return [*source.files, *given, *(os.path.join(d, "config.json") for d in sorted(folders))]


def output_paths(output: str) -> list[str]:
    """An output and its manifest: a report may replace neither, nor anything inside a folder output."""
    return [output, manifest_path(output)]


def check_report_path(path: str, option: str, *, reads: Iterable[str] = (), writes: Iterable[str] = (),
                      overwrite: bool = False) -> None:
    """Refuse a report path (``option``, e.g. ``--json``) that is a file the command reads, the
    output or a file inside it, a folder, in a missing folder, or an existing file without
    ``overwrite``.

    >>> check_report_path("report.json", "--json", reads=["model.safetensors"])   # doctest: +SKIP
    """
    if not path:
        raise OutputError(f"{option} needs a file name", hint=f"give {option} a file name such as report.json")
    _refuse_special(path, option)
    real = os.path.realpath(path)
    for protected, what in [(p, "a file this command reads") for p in reads] + [(p, "the output") for p in writes]:
        if _inside(real, os.path.realpath(protected)) or _same_file(path, protected):
            raise OutputError(f"{option} would overwrite {what} ({protected})", path=path,
                              hint=f"give {option} a new file name")
    if os.path.isdir(path):
        raise OutputError(f"{option} names a folder", path=path, hint="give a file name such as report.json")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"{option}: the folder does not exist", path=parent, hint="create it first")
    check_writable(parent, option)
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"{option} file exists", path=path, hint="pass --overwrite to replace it")


def check_report_folder(path: str, option: str, *, reads: Iterable[str] = (), overwrite: bool = False) -> None:
    """Refuse a report folder (``--report DIR``) that holds or is a file the command reads, whose
    parent is missing, or that exists without ``overwrite``; an existing one is replaced only if it
    is a quantkit report (it holds report.md and report.json) or empty."""
    if not path:
        raise OutputError(f"{option} needs a folder name", hint=f"give {option} a new folder such as report")
    real = os.path.realpath(path)
    for protected in reads:
        if protected and (_inside(os.path.realpath(protected), real) or _inside(real, os.path.realpath(protected))):
            raise OutputError(f"{option} would replace or write into a file or folder this command reads ({protected})",
                              path=path, hint=f"give {option} a new folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"{option}: the folder does not exist", path=parent, hint="create it first")
    check_writable(parent, option)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise OutputError(f"{option} names a file", path=path, hint="give a folder name")
        if not overwrite:
            raise OutputError(f"{option} folder exists", path=path, hint="pass --overwrite to replace it")
        found = set(os.listdir(path))
        if found and not {"report.md", "report.json"} <= found:
            raise OutputError(f"{option} folder holds files that are not a quantkit report; --overwrite would "
                              "delete them", path=path, hint="give a new folder name")


def check_writable(folder: str, what: str) -> None:
    """Refuse, before any work, a folder this process cannot create a file in (permissions, a
    read-only file system): found only when the output is written, it cost all the work. A file
    is created and removed to find out (``os.access`` says yes to root on any folder)."""
    probe = os.path.join(folder, f".quantkit-write-check.{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:          # this process's own, left by a check interrupted a moment ago
        fd = None
    except OSError as exc:
        raise OutputError(f"{what}: the folder is not writable ({exc.strerror})", path=folder,
                          hint="choose another folder") from None
    if fd is not None:
        os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def _refuse_special(path: str, what: str) -> None:
    """A device, FIFO or socket (``/dev/null``, ``/dev/stdout``) is never replaced: writing
    through a temporary file and renaming it would put a regular file in its place."""
    import stat
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OutputError(f"{what} is not a regular file (a device, FIFO or socket)", path=path,
                          hint="give a file name on disk")


def _inside(path: str, root: str) -> bool:
    """``path`` is ``root`` or lies under it (both real paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _same_file(a: str, b: str) -> bool:
    """Two names of one existing file (a hard link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
