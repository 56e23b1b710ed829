"""One reader for the JSON side files quantkit reads (a manifest, a shard index, a provenance
record, a config.json, a validation report, a stats file's metadata): bounded in size, duplicate
keys refused, and one error naming the file.

These files come from anywhere (a download, a hand edit): a file past its size limit is refused
before it is read whole, and a key given twice (which ``json`` would silently resolve to the last
one) is refused as the safetensors header's are. A file that cannot be opened raises its
``OSError`` unchanged: callers word a missing file differently from a broken one.

>>> read_json("model.quantkit.json", MAX_SIDE_FILE_BYTES)   # doctest: +SKIP
{'files': {...}, ...}
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable

MAX_SIDE_FILE_BYTES = 64 << 20     # a per-tensor table of a large model is a few MB


class JSONFileError(ValueError):
    """A JSON side file that is too large, not UTF-8, not JSON, or holds a key twice.

    ``path`` names the file; ``str(error)`` is what is wrong (``cause``'s message: callers word
    their own error around it, naming the file once); ``size`` is set for a file past its limit,
    ``duplicate`` for a key given twice."""

    def __init__(self, path: str | None, cause: BaseException, *, size: int | None = None,
                 duplicate: str | None = None):
        super().__init__(str(cause))
        self.path, self.cause, self.size, self.duplicate = path, cause, size, duplicate


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(f"duplicate key '{key}'")
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_json(path: str, limit: int = MAX_SIDE_FILE_BYTES, *,
              parse_constant: Callable[[str], object] | None = None) -> object:
    """The JSON document in the file ``path``, refused (``JSONFileError``) past ``limit`` bytes
    (before reading it), when not UTF-8 JSON, or with a key given twice in one object.
    ``parse_constant``: as ``json.loads`` (called for NaN and Infinity)."""
    return parse_json(read_side_file(path, limit), path, parse_constant=parse_constant)


def read_side_file(path: str, limit: int = MAX_SIDE_FILE_BYTES) -> bytes:
    """The bytes of the file ``path``, refused (``JSONFileError``) past ``limit`` bytes before they
    are read: for a caller that hashes what it parses (``parse_json``)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:      # a file that grew while it was read is refused too
        raise JSONFileError(path, ValueError(f"larger than {limit} bytes"), size=max(size, len(data)))
    return data


def parse_json(data: bytes | str, path: str | None = None, *,
               parse_constant: Callable[[str], object] | None = None) -> object:
    """``data`` (UTF-8 bytes or text) parsed as JSON, with ``read_json``'s rules; ``path`` names where
    it came from (a file, or the file whose metadata holds it)."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=parse_constant)
    except _DuplicateKey as exc:
        raise JSONFileError(path, exc, duplicate=exc.key) from None
    except (ValueError, RecursionError) as exc:       # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise JSONFileError(path, exc) from None
