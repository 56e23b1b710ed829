"""The release folder that ``quantkit publish`` writes and ``quantkit verify`` checks: its file
names, which files are weights, and ``SHA256SUMS`` in ``sha256sum``'s own format.

    DIR/<weights>          the output's weight files (and index), as ``quantkit convert`` wrote them
    DIR/<config files>     a folder format's other files (config.json, tokenizer, ...), a license
    DIR/README.md          the model card (``quantkit.publish.card``)
    DIR/provenance.json    source files and hashes, options, versions, validation (``PROVENANCE_SCHEMA``)
    DIR/SHA256SUMS         one ``<sha256>  <name>`` line per file above: ``sha256sum -c SHA256SUMS``

A name in a release is a '/'-separated path inside the folder; anything that could step out of it
(absolute, ``..``, backslashes, control characters) is refused when read. The source a release (or
an output's manifest) records is matched file by file, by name (``source_mismatches``), by publish
and verify alike.
"""
from __future__ import annotations

import os
import re

from ..formats.compressed_tensors import WEIGHT_SUFFIXES
from ..shards import is_index_name

CARD_NAME = "README.md"
PROVENANCE_NAME = "provenance.json"
SUMS_NAME = "SHA256SUMS"
RESERVED = (CARD_NAME, PROVENANCE_NAME, SUMS_NAME)   # written by publish, never copied from the output
PROVENANCE_SCHEMA = "quantkit.provenance/1"
MAX_SUMS_BYTES = 16 << 20        # a listing of a few thousand files is ~100 KB
MAX_PROVENANCE_BYTES = 64 << 20  # a per-tensor table of a large model is a few MB

LICENSE_FILE = re.compile(r"(?i)(licen[cs]e|copying|notice)([._-][\w.-]*)?")
_SUMS_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")


def is_weight_file(name: str) -> bool:
    """A file that holds (or indexes) tensors: what a release may not carry unlisted."""
    return name.lower().endswith(WEIGHT_SUFFIXES)


def file_role(name: str) -> str:
    """What a file of a release is: "weights", "index", "license" or "config"."""
    base = name.rsplit("/", 1)[-1]
    if is_index_name(base):
        return "index"
    if base.endswith(".safetensors"):
        return "weights"
    if LICENSE_FILE.fullmatch(base):
        return "license"
    return "config"


def safe_name(name: str) -> bool:
    """A relative '/'-separated path that stays inside the folder."""
    parts = name.split("/")
    return bool(name) and not _UNSAFE.search(name) and not name.startswith("/") and \
        all(p not in ("", ".", "..") for p in parts) and not re.match(r"[A-Za-z]:", name)


def format_sums(digests: dict[str, str]) -> bytes:
    """``SHA256SUMS`` text: ``<sha256>  <name>`` lines (two spaces: text mode), sorted by name."""
    for name in digests:
        if not safe_name(name):
            raise ValueError(f"{name!r} is not a plain relative path (sha256sum would escape it)")
    return "".join(f"{digests[n]}  {n}\n" for n in sorted(digests)).encode("utf-8")


def parse_sums(data: bytes) -> tuple[dict[str, str], list[str]]:
    """``SHA256SUMS`` -> (name -> sha256, problems): a line that is not ``<sha256>  <name>``, a name
    that leaves the folder, or a name listed twice is a problem (and not in the table)."""
    digests: dict[str, str] = {}
    problems = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {}, ["not UTF-8 text"]
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _SUMS_LINE.fullmatch(line)
        if m is None:
            problems.append(f"line {number} is not '<sha256>  <file name>' (64 lowercase hex digits, two spaces)")
        elif not safe_name(m.group(2)):
            problems.append(f"line {number} names {m.group(2)!r}, which is not a file inside the folder")
        elif m.group(2) in digests:
            problems.append(f"line {number} lists {m.group(2)} a second time")
        else:
            digests[m.group(2)] = m.group(1)
    return digests, problems


def read_bounded(path: str, limit: int) -> bytes:
    """A small file of the release (or a report), refused past ``limit`` bytes (ValueError)."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def source_files(against: str, record: dict) -> list[str]:
    """The weight files of the source checkpoint ``against``, opened as the conversion did (the
    component, EMA choice and names a manifest or provenance ``record`` holds)."""
    from ..sources import open_source
    with open_source(against, component=record.get("component"), ema=bool(record.get("ema")),
                     names=record.get("names")) as src:
        return list(src.files)


def source_mismatches(record: dict, digests: dict[str, str]) -> list[tuple[str, str | None, str]]:
    """(path, recorded sha256 or None, actual) of every source file whose SHA256 (``digests``: path ->
    sha256) is not the one ``record`` lists for its name, then (recorded name, sha256, "") for every
    recorded file the source does not have. Files are matched by name, as ``quantkit validate`` does."""
    recorded = {os.path.basename(f["name"]): f.get("sha256") for f in record.get("files") or []
                if isinstance(f, dict) and isinstance(f.get("name"), str)}
    bad = [(path, recorded.get(os.path.basename(path)), sha) for path, sha in digests.items()
           if recorded.get(os.path.basename(path)) != sha]
    names = {os.path.basename(p) for p in digests}
    return bad + [(name, sha, "") for name, sha in sorted(recorded.items()) if name not in names]
