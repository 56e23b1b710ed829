"""Verify a release folder (``quantkit publish``'s): is this what was published, and is it what it says?

1. Integrity: every file ``SHA256SUMS`` lists exists and has its SHA256; no other file is there
   (weights, configs, code: anything a loader may read), hosting metadata (``.git/``,
   ``.gitattributes``, ``.cache/huggingface/``) aside.
2. Agreement: ``provenance.json`` and the model card's Files table give the same SHA256 as
   ``SHA256SUMS`` for every file they name.
3. Structure: every weight file parses (its header validated like any input), declares the format
   and source the provenance records, and holds the tensors the provenance lists, stored as listed.
4. With ``against``: the source's files have the SHA256 the provenance records.

Never raises for a broken release: every problem is a ``Problem`` naming the file. Raises
``QuantkitError`` only for unusable arguments (not a release folder, a source that cannot be opened).

>>> verify("flux-fp8-release").ok                       # doctest: +SKIP
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from ..destinations import check_report_path
from ..errors import QuantkitError, UnsupportedInputError
from ..hashing import BackgroundHash
from ..jsonfiles import JSONFileError, read_json
from .card import listed_hashes
from ..progress import NULL, Progress
from .release import (CARD_NAME, MAX_PROVENANCE_BYTES, MAX_SUMS_BYTES, PROVENANCE_NAME, PROVENANCE_SCHEMA,
                      SUMS_NAME, is_weight_file, parse_sums, read_bounded, source_files, source_mismatches)

# What hosting adds beside a release, never part of it: a clone's own metadata, the Hub's LFS
# attributes, huggingface_hub's download bookkeeping (``local_dir``). Any other unlisted file is a
# problem: a loader may read it (a config, a tokenizer, remote code), so a release is exactly its listing.
HOSTING_FOLDERS = (".git", ".cache/huggingface")
HOSTING_FILES = (".gitattributes",)


@dataclass(frozen=True)
class Problem:
    file: str          # relative to the release folder (or the source's path for --against)
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class VerifyReport:
    folder: str
    against: str | None = None
    problems: list[Problem] = field(default_factory=list)
    checked: list[dict] = field(default_factory=list)     # {"file", "role", "expected", "actual", "ok"}
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, file: str, message: str) -> None:
        self.problems.append(Problem(file, message))

    def to_dict(self) -> dict:
        return {"ok": self.ok, "folder": self.folder, "against": self.against, "seconds": self.seconds,
                "problems": [asdict(p) for p in self.problems], "checked": self.checked}


def verify(folder: str, against: str | None = None, *, hashed: dict[str, str] | None = None,
           progress: Progress = NULL, reports: dict[str, str] | None = None,
           overwrite_reports: bool = False) -> VerifyReport:
    """Check the release ``folder``; with ``against`` (the source checkpoint) its hashes too.

    Args:
        folder: a release folder ``quantkit publish`` wrote (or a download of one).
        against: the source checkpoint: its files' SHA256 are checked against the provenance's.
        hashed: SHA256 already known for some files (publish hashed them while writing them), not
            read again.
        progress: receives stages and bytes done.
        reports: option -> path of files the caller writes afterwards, checked first (never inside
            the folder or the source).
        overwrite_reports: replace an existing report file.

    Returns:
        A ``VerifyReport``: ``ok``, and every problem found (file and what is wrong); a release that
        fails a check is a report with problems, not an exception.

    Raises:
        UnsupportedInputError: ``folder`` is not a release folder, or a report path is refused.

    >>> verify("release", against="all-MiniLM-L6-v2").ok          # doctest: +SKIP
    True
    """
    t0 = time.perf_counter()
    if not os.path.isdir(folder):
        raise UnsupportedInputError("not a folder", path=folder, hint="pass the release folder quantkit publish wrote")
    if not any(os.path.lexists(os.path.join(folder, n)) for n in (SUMS_NAME, PROVENANCE_NAME)):
        raise UnsupportedInputError(f"no {SUMS_NAME} and no {PROVENANCE_NAME}: not a release folder", path=folder,
                                    hint="pass the folder quantkit publish wrote")
    for option, path in (reports or {}).items():
        check_report_path(path, option, reads=[folder, *([against] if against else [])], overwrite=overwrite_reports)
    report = VerifyReport(folder, against)
    sums = _read_sums(folder, report)
    job = _start_hashes(folder, sums, hashed or {}, report)
    _unlisted(folder, sums, report)
    prov = _read_provenance(folder, sums, report)
    if prov is not None:
        _agreement(folder, sums, prov, report)
        _weights(folder, prov, report)
    _card(folder, sums, report)
    digests = dict(hashed or {})
    if job is not None:
        job.result()
        digests.update({name: job.digests[p] for name in sums if (p := os.path.join(folder, *name.split("/")))
                        in job.digests})
    for name, expected in sums.items():
        actual = digests.get(name)
        if actual is None:          # missing: reported
            continue
        report.checked.append({"file": name, "role": "release", "expected": expected, "actual": actual,
                               "ok": actual == expected})
        if actual != expected:
            report.problem(name, f"sha256 mismatch: {SUMS_NAME} says {expected[:16]}..., the file is "
                                 f"{actual[:16]}... (modified or corrupted)")
    if against is not None and prov is not None:
        _source(against, prov, report)
    progress.close()
    report.seconds = time.perf_counter() - t0
    return report


def _read_sums(folder: str, report: VerifyReport) -> dict[str, str]:
    path = os.path.join(folder, SUMS_NAME)
    try:
        data = read_bounded(path, MAX_SUMS_BYTES)
    except FileNotFoundError:
        report.problem(SUMS_NAME, "missing: no file of this folder can be checked against its published hash")
        return {}
    except (OSError, ValueError) as exc:
        report.problem(SUMS_NAME, f"unreadable ({exc})")
        return {}
    digests, problems = parse_sums(data)
    for p in problems:
        report.problem(SUMS_NAME, p)
    return digests


def _start_hashes(folder: str, sums: dict[str, str], hashed: dict[str, str], report: VerifyReport):
    """Hash every listed file that exists (on a thread, while the rest is checked); report missing ones."""
    paths = []
    for name in sorted(sums):
        path = os.path.join(folder, *name.split("/"))
        if not os.path.isfile(path):
            report.problem(name, f"listed in {SUMS_NAME} but missing")
        elif name not in hashed:
            paths.append(path)
    return BackgroundHash(paths).start() if paths else None


def _walk(folder: str):
    """Every file under ``folder`` ('/'-separated, sorted), hosting metadata left out."""
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        dirs[:] = sorted(d for d in dirs if prefix + d not in HOSTING_FOLDERS)
        for name in sorted(files):
            if prefix + name not in HOSTING_FILES:
                yield prefix + name


def _unlisted(folder: str, sums: dict[str, str], report: VerifyReport) -> None:
    for name in _walk(folder):
        if name in sums or name == SUMS_NAME:
            continue
        what = "weight file" if is_weight_file(name) else "file (a loader may read it: config, tokenizer, code)"
        report.problem(name, f"{what} not listed in {SUMS_NAME}: not part of the published release "
                             "(remove it, or re-publish)")


def _read_provenance(folder: str, sums: dict[str, str], report: VerifyReport) -> dict | None:
    if PROVENANCE_NAME not in sums and os.path.exists(os.path.join(folder, PROVENANCE_NAME)):
        report.problem(PROVENANCE_NAME, f"not listed in {SUMS_NAME}")
    try:
        doc = read_json(os.path.join(folder, PROVENANCE_NAME), MAX_PROVENANCE_BYTES)
    except FileNotFoundError:
        if PROVENANCE_NAME not in sums:      # listed and missing is already reported
            report.problem(PROVENANCE_NAME, "missing: the weights cannot be checked against their provenance")
        return None
    except (OSError, JSONFileError) as exc:
        report.problem(PROVENANCE_NAME, f"unreadable ({exc})")
        return None
    if not _well_formed(doc):
        report.problem(PROVENANCE_NAME, f"not a {PROVENANCE_SCHEMA} record (files, format, source, tensors)")
        return None
    return doc


def _well_formed(doc) -> bool:
    """The fields verify reads have the types publish writes (the file may be forged)."""
    if not isinstance(doc, dict) or doc.get("schema") != PROVENANCE_SCHEMA:
        return False
    files, source, tensors = doc.get("files"), doc.get("source"), doc.get("tensors")
    return (isinstance(files, list) and all(isinstance(f, dict) and isinstance(f.get("name"), str)
                                            and isinstance(f.get("role"), str) for f in files)
            and isinstance(doc.get("format"), str) and isinstance(source, dict)
            and isinstance(source.get("sha256"), (str, type(None))) and isinstance(source.get("files"), list)
            and all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in source["files"])
            and all(isinstance(source.get(k), (str, type(None))) for k in ("component", "names"))
            and isinstance(tensors, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                  for t in tensors))


def _agreement(folder: str, sums: dict[str, str], prov: dict, report: VerifyReport) -> None:
    """provenance.json and SHA256SUMS name the same files with the same hashes."""
    recorded = {f["name"]: f for f in prov["files"]}
    for name, f in recorded.items():
        if name not in sums:
            report.problem(name, f"recorded in {PROVENANCE_NAME} but not listed in {SUMS_NAME}")
        elif f.get("sha256") != sums[name]:
            report.problem(name, f"{PROVENANCE_NAME} records sha256 {str(f.get('sha256'))[:16]}..., {SUMS_NAME} "
                                 f"says {sums[name][:16]}...")
    for name in sums:
        if is_weight_file(name) and name not in recorded:
            report.problem(name, f"weight file listed in {SUMS_NAME} but not recorded in {PROVENANCE_NAME}")


def _card(folder: str, sums: dict[str, str], report: VerifyReport) -> None:
    """The card's Files table shows, for every weight file, the SHA256 that SHA256SUMS lists."""
    if CARD_NAME not in sums:
        report.problem(CARD_NAME, f"not listed in {SUMS_NAME}" if os.path.exists(os.path.join(folder, CARD_NAME))
                       else "missing: the release has no model card")
    try:
        with open(os.path.join(folder, CARD_NAME), "rb") as f:
            card = f.read(MAX_PROVENANCE_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return
    shown = listed_hashes(card)
    for name, sha in shown.items():
        if name in sums and sha != sums[name]:
            report.problem(CARD_NAME, f"the card shows sha256 {sha[:16]}... for {name}, {SUMS_NAME} says "
                                      f"{sums[name][:16]}...")
    for name in sums:
        if is_weight_file(name) and name not in shown:
            report.problem(CARD_NAME, f"the card's Files table shows no sha256 for {name}")


def _weights(folder: str, prov: dict, report: VerifyReport) -> None:
    """Each weight file parses, declares the provenance's format and source; together they hold the
    provenance's tensors, stored as it says."""
    from ..reader import SafetensorsFile
    fmt_name = prov["format"]
    source_sha = prov["source"]["sha256"]
    readable = True
    for f in prov["files"]:
        path = os.path.join(folder, *f["name"].split("/"))
        if f["role"] in ("weights", "index") and not os.path.isfile(path):
            readable = False                 # reported as missing
        if f["role"] != "weights" or not os.path.isfile(path):
            continue
        try:
            with SafetensorsFile(path) as w:
                meta = w.metadata
        except QuantkitError as exc:
            report.problem(f["name"], f"does not parse as safetensors: {exc.message}")
            readable = False
            continue
        if meta.get("quantkit.format") != fmt_name:
            report.problem(f["name"], f"declares format {meta.get('quantkit.format')!r}, {PROVENANCE_NAME} says "
                                      f"{fmt_name!r}")
        # Outputs of earlier quantkit builds record the source's SHA256 in the header too (now the manifest
        # alone does, so the output's hash need not wait for the source's): where present it must agree.
        if source_sha and "quantkit.source_sha256" in meta and meta["quantkit.source_sha256"] != source_sha:
            report.problem(f["name"], f"records source sha256 {str(meta.get('quantkit.source_sha256'))[:16]}..., "
                                      f"{PROVENANCE_NAME} says {source_sha[:16]}...")
    if readable:     # a missing or unparseable piece is reported: reading the whole would only repeat it
        _tensors(folder, prov, report)


def _tensors(folder: str, prov: dict, report: VerifyReport) -> None:
    from ..formats import get_format
    files = [f for f in prov["files"] if f["role"] in ("weights", "index")]
    index = [f["name"] for f in files if f["role"] == "index"]
    label = index[0] if index else (files[0]["name"] if files else PROVENANCE_NAME)
    try:
        fmt = get_format(prov["format"])
        with _open_weights(folder, files) as out:
            # source tensor -> (quantized, shape, dtype code) as the weights hold it
            stored = {name: (s.scale_key is not None, list(out.tensors[s.data_key].shape),
                             out.tensors[s.data_key].dtype.code) for name, s in fmt.stored(out).items()}
    except QuantkitError as exc:          # FormatError: the file breaks its format's conventions
        report.problem(label, f"does not read back as format {prov['format']!r}: {exc}")
        return
    listed = {t["name"]: t for t in prov["tensors"]}
    for name in sorted(listed.keys() - stored.keys()):
        report.problem(label, f"tensor {name} is in {PROVENANCE_NAME} but not in the weights")
    for name in sorted(stored.keys() - listed.keys()):
        report.problem(label, f"tensor {name} is in the weights but not in {PROVENANCE_NAME}")
    for name in sorted(stored.keys() & listed.keys()):
        row = listed[name]
        recorded = (row.get("action") == "quantize", row.get("shape"), row.get("stored"))
        if stored[name] != recorded:
            report.problem(label, f"tensor {name} is stored {_describe(stored[name])}, {PROVENANCE_NAME} says "
                                  f"{_describe(recorded)}")


def _describe(stored: tuple) -> str:
    quantized, shape, dtype = stored
    return f"{dtype} {shape}" + (" with a scale" if quantized else "")


def _open_weights(folder: str, files: list[dict]):
    from ..checkpoint import open_checkpoint
    from ..reader import SafetensorsFile
    index = [f["name"] for f in files if f["role"] == "index"]
    if index:
        return open_checkpoint(os.path.join(folder, *index[0].split("/")), ema=None)
    if len(files) != 1:
        raise UnsupportedInputError(f"{len(files)} weight files and no index", path=folder)
    return SafetensorsFile(os.path.join(folder, *files[0]["name"].split("/")))


def _source(against: str, prov: dict, report: VerifyReport) -> None:
    """The source's files have the SHA256 the provenance records (matched by file name)."""
    record = prov["source"]
    job = BackgroundHash(source_files(against, record)).start()
    job.result()
    bad = {path: (expected, actual) for path, expected, actual in source_mismatches(record, job.digests)}
    for path, actual in job.digests.items():
        expected = bad.get(path, (actual,))[0]
        report.checked.append({"file": path, "role": "source", "expected": expected, "actual": actual,
                               "ok": path not in bad})
    for path, (expected, actual) in bad.items():
        if not actual:
            report.problem(os.path.join(against, path), f"recorded in {PROVENANCE_NAME} but not part of the source")
        elif expected is None:
            report.problem(path, f"a file of the source that {PROVENANCE_NAME} does not record")
        else:
            report.problem(path, f"sha256 mismatch: {PROVENANCE_NAME} records {expected[:16]}..., the file is "
                                 f"{actual[:16]}... (not the source this release was made from)")
