"""Publish stage: a quantkit output as a release folder that others can check.

    OUT (+ its manifest) [+ SRC] [+ a validate --json report]
      -> checks: OUT's files have its manifest's SHA256, SRC is the recorded source, validation passed
      -> DIR/ (temporary name): the weights and config files (copied, hashed while copied, or
         hard-linked), the source's license file, provenance.json, README.md, SHA256SUMS
      -> verify the folder (structure, agreement; hashes already known) -> rename into place

What the manifest records (every output file and source file with its SHA256, the options, the
versions, the policy) needs nothing else. The source (``against``) adds: its hashes re-checked,
its license file and model card (license, library, task), the base model id when it sits in a
Hugging Face cache, and validation run now. OUT is only read; nothing appears under DIR until the
release is complete and verified.

>>> publish("minilm-fp8", "release", PublishOptions(against="all-MiniLM-L6-v2"))   # doctest: +SKIP
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field

from . import model_card
from .errors import OptionsError, OutputError, QuantkitError, UnsupportedInputError, ValidationFailed
from .hashing import READ_BYTES, BackgroundHash, sha256_file
from .manifest import manifest_path, read_manifest, runtime_versions
from .progress import NULL, Progress
from .provenance import calibration_record, convert_command, from_report, tensor_table, validation_record
from .release import (CARD_NAME, PROVENANCE_NAME, PROVENANCE_SCHEMA, RESERVED, SUMS_NAME,
                      format_sums, safe_name, source_files, source_mismatches)
from .shards import is_index_name
from .verify import verify
from .destinations import check_report_path, check_writable
from .writer import TempFolder, check_no_other_writer, remove_stale_temps, write_atomic

_BASE_MODEL = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_LICENSE_FILE = re.compile(r"(?i)(licen[cs]e|copying|notice)([._-][\w.-]*)?")
_HF_CACHE = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+(?:/|$)")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")    # ORG/NAME on the Hugging Face Hub
HUB_FILE_RECOMMENDED = 20 * 10**9    # the Hugging Face Hub's advice per file (it refuses files over 50 GB)


@dataclass(frozen=True)
class PublishOptions:
    against: str | None = None          # the source checkpoint: re-check its hashes, carry its license, validate
    report: str | None = None           # a ``quantkit validate --json`` report of OUT (instead of validating now)
    model_output: bool = False          # validating now: also compare the model's outputs
    base_model: tuple[str, ...] = ()    # hub ids of the original model
    license: str | None = None          # license id when the source's is not found (or to override it)
    name: str | None = None             # the card's title (default: DIR's name)
    link: bool = False                  # hard-link the weights instead of copying them
    overwrite: bool = False
    command: str | None = None          # the publish command line, recorded in the provenance

    def __post_init__(self):
        for b in self.base_model:
            if not _BASE_MODEL.fullmatch(b):
                raise OptionsError(f"--base-model {b!r} is not a model id", hint="give ORG/NAME as on the model hub")
        if self.license is not None and not re.fullmatch(r"[\w.+-]+", self.license):
            raise OptionsError(f"--license {self.license!r} is not a license id",
                                hint="give an SPDX-like id such as apache-2.0, mit or other")
        if self.model_output and self.against is None:
            raise OptionsError("--model-output compares with the source model", hint="pass --against SRC")
        if self.model_output and self.report is not None:
            raise OptionsError("--model-output runs a validation, --report reuses one",
                                hint="give one of them (validate --model-output --json makes such a report)")


@dataclass
class PublishResult:
    folder: str
    files: list[dict]
    sums_sha256: str
    validation: dict | None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def publish(out: str, dst: str, options: PublishOptions = PublishOptions(), *,
            progress: Progress = NULL, reports: dict[str, str] | None = None) -> PublishResult:
    """Write the release folder ``dst`` for the quantkit output ``out`` (see the module docstring).

    ``reports`` (option -> path): files the caller writes afterwards, checked before any work (never
    a file publish reads, never inside ``dst``; an existing one is replaced with ``options.overwrite``)."""
    t0 = time.perf_counter()
    out, dst = os.fspath(out), os.fspath(dst)
    result = PublishResult(dst, [], "", None)

    def warn(message: str) -> None:
        result.warnings.append(message)
        progress.warn(message)

    manifest = _read_output_manifest(out)
    listed = _output_files(out, manifest, result.notes)
    _check_destination(out, dst, options)
    check_no_other_writer(dst)
    for path in remove_stale_temps(dst):
        progress.warn(f"removed a temporary folder left by an interrupted run: {path}")
    source = _Source(manifest, options.against)
    reads = [out, manifest_path(out), *(p for p in (options.report,) if p), *source.files]
    for option, path in (reports or {}).items():
        check_report_path(path, option, reads=reads, writes=[dst], overwrite=options.overwrite)
    source.start()
    try:
        try:
            validation = _validation(out, manifest, options, progress)
        except ValidationFailed:
            source.check()      # another checkpoint than the source explains a failed validation: say that
            raise
        source.check()
    finally:
        source.close()
    with TempFolder(dst) as folder:
        try:
            digests = _place_files(listed, folder.path, options.link, result.notes, progress)
            _check_output_hashes(out, listed, digests)
            for name, path in source.license_files(exclude=set(digests)):
                digests[name] = _place(path, os.path.join(folder.path, name), False)
            prov = _record(out, dst, manifest, options, source, validation, folder.path, digests)
            if prov["base_model"] and not options.base_model:
                result.notes.append(f"base model {prov['base_model'][0]}, from {prov['base_model_from']}")
            for w in _warnings(prov, source, manifest):
                warn(w)
            prov["warnings"] = list(result.warnings)
            digests[PROVENANCE_NAME] = write_atomic(os.path.join(folder.path, PROVENANCE_NAME),
                                                    (json.dumps(prov, indent=2, ensure_ascii=False) + "\n").encode())
            digests[CARD_NAME] = write_atomic(os.path.join(folder.path, CARD_NAME), model_card.render(prov).encode())
            result.sums_sha256 = write_atomic(os.path.join(folder.path, SUMS_NAME), format_sums(digests))
            check = verify(folder.path, hashed=digests)
            if not check.ok:
                raise OutputError("the release failed its own verification: "
                                  + "; ".join(str(p) for p in check.problems[:5]), path=dst,
                                  hint="this is a bug in quantkit publish; nothing was published")
        except QuantkitError as exc:     # name the release's file, not its temporary folder
            if exc.path and exc.path.startswith(folder.path):
                exc.path = dst + exc.path[len(folder.path):]
            raise
        folder.commit()
    result.files = [{"name": n, "sha256": digests[n], "bytes": os.path.getsize(os.path.join(dst, *n.split("/")))}
                    for n in sorted(digests)]
    result.validation = validation
    result.seconds = time.perf_counter() - t0
    progress.close()
    return result


# ----------------------------------------------------------------------------- the output

def _read_output_manifest(out: str) -> dict:
    if not os.path.exists(out):
        raise UnsupportedInputError("does not exist", path=out, hint="pass an output written by quantkit convert")
    try:
        manifest = read_manifest(out)
    except ValidationFailed as exc:
        raise UnsupportedInputError(f"{exc.message}: only an output with its manifest can be published",
                                    path=exc.path, hint="publish an output written by quantkit convert, with its "
                                    "manifest beside it") from None
    if not _well_formed(manifest):
        raise UnsupportedInputError("the manifest does not record the conversion and source as quantkit convert "
                                    "writes them", path=manifest_path(out),
                                    hint="re-run quantkit convert to rewrite it")
    return manifest


def _well_formed(manifest: dict) -> bool:
    """The fields publish reads have the types quantkit convert writes (the file may have been edited)."""
    c, s = manifest.get("conversion"), manifest.get("source")
    policy = c.get("policy") if isinstance(c, dict) else None
    return (isinstance(c, dict)
            and all(isinstance(c.get(k), str) for k in ("format", "fp8", "granularity", "keep_dtype"))
            and isinstance(c.get("counts"), dict) and isinstance(policy, dict) and isinstance(policy.get("name"), str)
            and isinstance(policy.get("rules"), list) and all(
                isinstance(r, list) and len(r) == 2 and r[0] in ("quantize", "keep") and isinstance(r[1], str)
                for r in policy["rules"])
            and isinstance(c.get("options"), (dict, type(None)))
            and isinstance(c.get("decisions", []), list)
            and all(isinstance(d, list) and len(d) == 4 and all(isinstance(x, str) for x in d)
                    for d in c.get("decisions", []))
            and isinstance(s, dict) and isinstance(s.get("files"), list)
            and all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in s["files"]))


def _output_files(out: str, manifest: dict, notes: list[str]) -> list[tuple[str, str, dict]]:
    """(name in the release, path, manifest entry) of every file of the output, in name order. A
    folder output's model card (the source's, copied by compressed-tensors) is replaced by the
    release's own; names publish writes itself are never copied."""
    folder = os.path.isdir(out)
    files = []
    for name, entry in sorted(manifest["files"].items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise UnsupportedInputError(f"the manifest's entry for {name} has no sha256", path=manifest_path(out),
                                        hint="re-run quantkit convert to rewrite it")
        if not safe_name(name) or (not folder and "/" in name):
            raise UnsupportedInputError(f"the manifest names {name!r}, not a file of the output",
                                        path=manifest_path(out), hint="re-run quantkit convert to rewrite it")
        if name in RESERVED:
            notes.append(f"{name} of the output is not copied: the release writes its own"
                         + (" (the source's license is carried into the new card)" if name == CARD_NAME else ""))
            continue
        path = os.path.join(out, *name.split("/")) if folder else out
        if not os.path.isfile(path):
            raise ValidationFailed(f"{name} is listed in the manifest but missing", path=path,
                                   hint="re-run quantkit convert; nothing was published")
        files.append((name, path, entry))
    if not any(_role(n) == "weights" for n, _, _ in files):
        raise UnsupportedInputError("the manifest lists no weight file", path=manifest_path(out),
                                    hint="re-run quantkit convert to rewrite it")
    return files


def _role(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    if is_index_name(base):
        return "index"
    if base.endswith(".safetensors"):
        return "weights"
    if _LICENSE_FILE.fullmatch(base):
        return "license"
    return "config"


def _check_destination(out: str, dst: str, options: PublishOptions) -> None:
    real_dst = os.path.realpath(dst)

    def inside(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
    if inside(real_dst, os.path.realpath(out)):
        raise OutputError("destination is the output or inside it", path=dst, hint="choose a new folder")
    if options.against is not None and os.path.isdir(options.against) \
            and inside(real_dst, os.path.realpath(options.against)):
        raise OutputError(f"destination is inside the source folder {options.against}, which quantkit never "
                          "modifies", path=dst, hint="choose a folder outside the source")
    for what, path in (("output", out), ("source", options.against)):
        if path is not None and inside(os.path.realpath(path), real_dst):
            raise OutputError(f"destination holds the {what}; publishing would replace it", path=dst,
                              hint="choose a new folder")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise OutputError("destination is a file", path=dst, hint="give a folder name")
    if os.path.exists(dst) and not options.overwrite:
        raise OutputError("destination exists", path=dst, hint="pass --overwrite to replace it")
    if os.path.isdir(dst) and os.listdir(dst) and not any(os.path.isfile(os.path.join(dst, n))
                                                          for n in (SUMS_NAME, PROVENANCE_NAME)):
        raise OutputError("destination is a folder quantkit publish did not write; --overwrite would delete its "
                          "files", path=dst, hint="give a new folder name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(dst))):
        raise OutputError("destination's parent folder does not exist", path=os.path.dirname(os.path.abspath(dst)),
                          hint="create it first")
    check_writable(os.path.dirname(os.path.abspath(dst)), "destination")


def _place_files(listed, folder: str, link: bool, notes: list[str], progress: Progress) -> dict[str, str]:
    digests, copied = {}, []
    progress.stage("publish", sum(os.path.getsize(path) for _, path, _ in listed))
    for name, path, _ in listed:
        digests[name] = _place(path, os.path.join(folder, *name.split("/")), link, progress.advance)
        if link and not os.path.samefile(path, os.path.join(folder, *name.split("/"))):
            copied.append(name)
    if link and copied:
        notes.append(f"copied instead of hard-linked (another file system?): {', '.join(copied)}")
    return digests


def _place(src: str, dst: str, link: bool, advance=lambda n: None) -> str:
    """Hard-link (when asked and possible) or copy ``src`` to ``dst``; its SHA256 (a copy is hashed
    from the bytes it writes: one read of the output). ``advance(n)`` after each piece."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if link:
        try:
            os.link(src, dst)
        except OSError:          # another file system, or links refused: copy
            pass
        else:
            digest = sha256_file(dst)
            advance(os.path.getsize(dst))
            return digest
    h = hashlib.sha256()
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    try:
        with open(src, "rb", buffering=0) as fi, open(dst, "xb", buffering=0) as fo:
            while n := fi.readinto(buf):
                h.update(view[:n])
                piece = view[:n]
                while piece:
                    piece = piece[fo.write(piece):]
                advance(n)
            os.fsync(fo.fileno())
    except OSError as exc:
        what = "disk full" if exc.errno == errno.ENOSPC else f"copy failed: {exc.strerror}"
        raise OutputError(what, path=dst, hint="free space or choose another destination; nothing was left behind") \
            from None
    return h.hexdigest()


def _check_output_hashes(out: str, listed, digests: dict[str, str]) -> None:
    bad = [(name, path, entry["sha256"]) for name, path, entry in listed if digests[name] != entry["sha256"]]
    if bad:
        raise ValidationFailed("; ".join(f"{path}: sha256 {digests[n][:16]}... does not match the manifest's "
                                         f"{sha[:16]}..." for n, path, sha in bad), path=None,
                               hint="the output was modified or corrupted since quantkit convert wrote it; "
                                    "re-run convert; nothing was published")


# ----------------------------------------------------------------------------- the source

class _Source:
    """What the source adds when it is given: its hashes checked against the manifest (on a thread
    while the output is validated), its license files and model card, a base model id."""

    def __init__(self, manifest: dict, against: str | None):
        self.record = manifest["source"]
        self.against = against
        self.folders: list[str] = []
        self.files: list[str] = []
        self._hash = None
        if against is None:
            return
        self.files = source_files(against, self.record)
        folder = os.path.dirname(os.path.abspath(self.files[0]))
        top = os.path.abspath(against) if os.path.isdir(against) else os.path.dirname(os.path.abspath(against))
        while True:               # the weights' folder up to the folder given (a pipeline's root)
            self.folders.append(folder)
            if folder == top or not folder.startswith(top + os.sep):
                break
            folder = os.path.dirname(folder)
        pipeline = os.path.dirname(top)   # a component folder given: its pipeline's license and card
        if os.path.isfile(os.path.join(pipeline, "model_index.json")):
            self.folders.append(pipeline)

    def start(self) -> None:
        """Hash the source's files on a thread (checked by ``check``)."""
        if self.files:
            self._hash = BackgroundHash(self.files).start()

    def check(self) -> None:
        """The source's files have the SHA256 the manifest recorded (file by file, by name)."""
        if self._hash is None:
            return
        self._hash.result()
        for path, expected, actual in source_mismatches(self.record, self._hash.digests):
            what = (f"sha256 {actual[:16]}..., the manifest records {str(expected)[:16]}..." if actual
                    else "the manifest records this file, the source given has none of that name")
            raise UnsupportedInputError(f"not the source of this output: {what}", path=path,
                                        hint="pass the checkpoint the output was converted from")

    def close(self) -> None:
        if self._hash is not None:
            self._hash.cancel()

    def license_files(self, exclude: set[str]) -> list[tuple[str, str]]:
        """(name, path) of the license files beside the source, nearest folder first."""
        found = {}
        for folder in self.folders:
            for name in sorted(os.listdir(folder)):
                if _LICENSE_FILE.fullmatch(name) and os.path.isfile(os.path.join(folder, name)) \
                        and name not in exclude and name not in found:
                    found[name] = os.path.join(folder, name)
        return sorted(found.items())

    def card(self, out: str) -> tuple[dict, str | None]:
        """The source's model card front matter and where it was read: beside the source, or the copy a
        folder output carries."""
        places = [os.path.join(f, CARD_NAME) for f in self.folders]
        if os.path.isdir(out):
            places.append(os.path.join(out, CARD_NAME))
        for path in places:
            try:
                with open(path, "rb") as f:
                    fields = model_card.read_front_matter(f.read(1 << 20).decode("utf-8", errors="replace"))
            except OSError:
                continue
            if fields:
                return fields, path
        return {}, None

    def base_model(self, out: str) -> tuple[str, str, bool] | None:
        """(``org/name``, where it was found, whether it is the source itself) of the original, or None.
        The source sits in a Hugging Face cache (``models--org--name/snapshots/<rev>/``): that is the
        source itself. Its model card's ``base_model`` and its ``config.json``'s ``_name_or_path`` name
        the model it was made or loaded from: its parent when the source is a fine-tune (all-MiniLM-L6-v2
        names nreimers/MiniLM-L6-H384-uncased), so only a candidate for the user to confirm."""
        for path in [self.against or ""] + self.folders:
            m = _HF_CACHE.search(os.path.abspath(path).replace(os.sep, "/") + "/") if path else None
            if m:
                return f"{m.group(1)}/{m.group(2)}", "the source's Hugging Face cache path", True
        card, card_path = self.card(out)
        named = card.get("base_model")
        named = named[0] if isinstance(named, list) and len(named) == 1 else named
        if isinstance(named, str) and _HUB_ID.fullmatch(named):
            return named, f"the base_model of the source's model card ({os.path.basename(card_path)})", False
        for folder in self.folders + ([out] if os.path.isdir(out) else []):
            try:
                with open(os.path.join(folder, "config.json"), "rb") as f:
                    config = json.loads(f.read(1 << 20))
            except (OSError, ValueError):
                continue
            named = config.get("_name_or_path") if isinstance(config, dict) else None
            if isinstance(named, str) and _HUB_ID.fullmatch(named) and not os.path.exists(named):
                return named, "the _name_or_path of the source's config.json", False
        return None


# ----------------------------------------------------------------------------- validation

def _validation(out: str, manifest: dict, options: PublishOptions, progress: Progress) -> dict | None:
    """The validation summary the card shows: from ``options.report``, or run now against the source."""
    if options.report is not None:
        return from_report(options.report, manifest)
    if options.against is None:
        return None
    from .validation import validate
    report = validate(out, options.against, check_hash=False, model_output=options.model_output, progress=progress)
    if not report.ok:
        raise ValidationFailed(f"validation failed, {len(report.failures)} problem(s): "
                               + "; ".join(report.failures[:3]), path=out,
                               hint="quantkit validate lists every problem; nothing was published")
    return validation_record(report.to_dict(), "Validated by `quantkit publish` (per tensor"
                              + (", and at the model's output)" if options.model_output else ")"),
                              os.path.basename(os.path.abspath(options.against)))


# ----------------------------------------------------------------------------- provenance

def _record(out: str, dst: str, manifest: dict, options: PublishOptions, source: _Source,
            validation: dict | None, folder: str, digests: dict[str, str]) -> dict:
    """The release's record: everything the card says, as data (``PROVENANCE_SCHEMA``)."""
    from .dtypes import FP8_FORMATS
    conversion = dict(manifest["conversion"])
    fp8 = FP8_FORMATS.get(conversion.get("fp8"))
    conversion["scale_rule"] = (f"scale = absmax / {fp8.max_finite:g} (the {fp8.name} maximum), per "
                                f"{conversion['granularity']}" if fp8 else "recorded in the weights")
    card, card_path = source.card(out)
    lic_id = options.license or card.get("license")
    lic_from = "--license" if options.license else ("the source's model card" if card.get("license") else
                                                     "the source's license file")
    files = [{"name": n, "sha256": digests[n], "bytes": os.path.getsize(os.path.join(folder, *n.split("/"))),
              "role": _role(n)} for n in sorted(digests)]
    found = None if options.base_model else source.base_model(out)
    base = list(options.base_model) or ([found[0]] if found and found[2] else [])
    with open(manifest_path(out), "rb") as f:
        manifest_sha = hashlib.sha256(f.read()).hexdigest()
    return {
        "schema": PROVENANCE_SCHEMA,
        "name": options.name or os.path.basename(os.path.abspath(dst)),
        "base_model": base,
        "base_model_from": ("--base-model" if options.base_model else found[1]) if base else None,
        "base_model_candidate": {"id": found[0], "from": found[1]} if found and not found[2] else None,
        "license": {"id": lic_id, "name": card.get("license_name"), "link": card.get("license_link"),
                    "from": lic_from, "files": [f["name"] for f in files if f["role"] == "license"]},
        "source_card": {k: card[k] for k in ("library_name", "pipeline_tag", "language") if k in card} or None,
        "format": conversion["format"],
        "files": files,
        "output": {"name": os.path.basename(os.path.abspath(out)), "created": manifest.get("created"),
                   "manifest": {"name": os.path.basename(manifest_path(out)), "sha256": manifest_sha},
                   "bytes": sum(f["bytes"] for f in files if f["role"] == "weights")},
        "source": {**source.record, "checked": source.against is not None,
                   "card": os.path.basename(card_path) if card_path else None},
        "conversion": conversion,
        "calibration": calibration_record(conversion),
        "command": {"convert": convert_command(conversion, source.record.get("name") or "SOURCE",
                                               os.path.basename(os.path.abspath(out))),
                    "publish": options.command},
        "versions": {"converted_with": manifest.get("versions") or {"quantkit": manifest.get("quantkit_version")},
                     "published_with": runtime_versions()},
        "validation": validation,
        "tensors": tensor_table(out, conversion),
        "warnings": [],
    }


def _warnings(prov: dict, source: _Source, manifest: dict) -> list[str]:
    out = []
    lic = prov["license"]
    if not lic["files"]:
        out.append(("the source has no license file: the release carries the license id "
                    f"{lic['id']!r} ({lic['from']}) but no license text" if lic["id"] else
                    "no license found (no license file, no license in a model card): the card says so; pass "
                    "--license ID" + ("" if source.against else ", or --against SRC to carry the source's")))
    if prov["validation"] is None:
        out.append("no validation was run: the card says 'Not validated'; pass --against SRC (validates now) or "
                   "--report REPORT (from quantkit validate --json)")
    elif not prov["validation"]["summary"].get("tensors"):
        out.append("the validation report compared no tensor with the source (integrity only): the card shows no "
                   "figures; validate with --against SRC")
    candidate = prov.get("base_model_candidate")
    if candidate:
        out.append(f"no base model given: {candidate['from']} names {candidate['id']}, the model the source was "
                   "made from (its parent if the source is a fine-tune), so the card does not claim it; pass "
                   f"--base-model {candidate['id']} if that is the model you converted, or the source's own id")
    elif not prov["base_model"]:
        out.append("no base model found (no --base-model; " + (
            "the source is in no Hugging Face cache, its model card names no base_model and its config.json no "
            "hub id in _name_or_path" if source.against else "without --against SRC the source is not looked at")
            + "): the card cannot name the original; pass --base-model ORG/NAME")
    if manifest["conversion"].get("options") is None:
        out.append("the manifest predates recorded options: the reproduce command names the preset but cannot tell "
                   "the user's --quantize/--keep rules apart; re-run quantkit convert to record them")
    for f in prov["files"]:
        if f["role"] == "weights" and f["bytes"] > HUB_FILE_RECOMMENDED:
            out.append(f"{f['name']} is {f['bytes'] / 1e9:.0f} GB: the Hugging Face Hub advises files under 20 GB "
                       "and refuses files over 50 GB; formats native and compressed-tensors can be sharded "
                       "(convert with --max-shard-size 5GB)")
    return out
