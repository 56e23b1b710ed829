"""The manifest beside an output: SHA256 and size of every file written, and its provenance.

``out.safetensors`` gets ``out.quantkit.json``; a folder output holds ``quantkit.json``.
``quantkit validate`` checks the output against it, so a flipped byte anywhere is caught.
"""
from __future__ import annotations

import json
import os
import time

from ._version import __version__
from .errors import ValidationFailed
from .jsonfiles import read_json
from .writer import write_atomic

SUFFIX = ".quantkit.json"


FOLDER_MANIFEST = "quantkit.json"


def manifest_path(output: str) -> str:
    if os.path.isdir(output):
        return os.path.join(output, FOLDER_MANIFEST)
    base = output[: -len(".safetensors")] if output.endswith(".safetensors") else output
    return base + SUFFIX


def write_manifest(output: str, *, files: dict[str, dict], source: dict | None, conversion: dict) -> str:
    doc = {
        "quantkit_version": __version__,
        "versions": runtime_versions(),  # what a byte-identical rerun needs (quantkit publish records it)
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,                  # name (relative to the manifest) -> {"sha256", "bytes"}
        "source": source,                # {"name", "sha256", "bytes"} or None
        "conversion": conversion,
    }
    path = manifest_path(output)
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return path


def runtime_versions() -> dict[str, str | None]:
    """Versions of quantkit, Python and the libraries that decide an output's bytes (without importing them)."""
    from importlib.metadata import PackageNotFoundError, version
    import platform

    def of(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None
    return {"quantkit": __version__, "python": platform.python_version(), "torch": of("torch"),
            "safetensors": of("safetensors"), "numpy": of("numpy")}


def read_manifest(output: str) -> dict:
    path = manifest_path(output)
    try:
        doc = read_json(path)
    except FileNotFoundError:
        raise ValidationFailed("no manifest: the output's hash cannot be verified", path=path,
                               hint="validate outputs written by quantkit convert, or pass --no-hash-check") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValidationFailed(f"manifest unreadable ({exc})", path=path,
                               hint="re-run quantkit convert to rewrite it") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise ValidationFailed("manifest has no 'files' table", path=path, hint="re-run quantkit convert")
    return doc


def file_entry(path: str, sha256: str) -> dict:
    return {"sha256": sha256, "bytes": os.path.getsize(path)}


def source_name(src: str) -> str:
    """How records name a source: its base name, from the absolute path ('.' or 'dir/' name the
    folder itself, so the bytes written do not depend on the working directory)."""
    return os.path.basename(os.path.abspath(src))


def source_files(src: str, files: list[str], digests: dict[str, str]) -> list[dict]:
    """Each file of the source ``src`` (a file or a folder) with its SHA256 and size, named relative
    to the source's folder with '/' (a manifest's, a stats file's and a release's record)."""
    base = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    return [{"name": os.path.relpath(f, base).replace(os.sep, "/"), "sha256": digests[f], "bytes": os.path.getsize(f)}
            for f in files]
