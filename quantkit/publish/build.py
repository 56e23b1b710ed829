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

import json
import os
import re
import time
from dataclasses import dataclass, field

from ..destinations import check_report_path, check_writable
from ..errors import OptionsError, OutputError, QuantkitError, ValidationFailed
from ..manifest import manifest_path
from ..progress import NULL, Progress
from ..writer import TempFolder, check_no_other_writer, remove_stale_temps, write_atomic
from . import card
from .output import check_output_hashes, output_files, place, place_files, read_output_manifest
from .provenance import record, validation as validation_summary
from .release import CARD_NAME, PROVENANCE_NAME, SUMS_NAME, format_sums
from .source import Source
from .verify import verify

_BASE_MODEL = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
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

    Args:
        out: an output ``quantkit convert`` wrote, with its manifest beside it (only read).
        dst: the release folder; nothing appears under it until the release is complete and verified.
        options: the source to check against, a validation report, the card's fields (``PublishOptions``).
        progress: receives stages, bytes done and warnings.
        reports: option -> path of files the caller writes afterwards, checked before any work
            (never a file publish reads, never inside ``dst``; an existing one is replaced with
            ``options.overwrite``).

    Returns:
        A ``PublishResult``: the release's files with their SHA256, SHA256SUMS' own SHA256, the
        validation summary, warnings and notes.

    Raises:
        ValidationFailed: the output does not match its manifest, or validation failed.
        QuantkitError: another subclass for bad input (not the source, a destination refused...).

    >>> publish("minilm-fp8.safetensors", "release", PublishOptions(against="all-MiniLM-L6-v2"))  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    out, dst = os.fspath(out), os.fspath(dst)
    result = PublishResult(dst, [], "", None)

    def warn(message: str) -> None:
        result.warnings.append(message)
        progress.warn(message)

    manifest = read_output_manifest(out)
    listed = output_files(out, manifest, result.notes)
    _check_destination(out, dst, options)
    check_no_other_writer(dst)
    for path in remove_stale_temps(dst):
        progress.warn(f"removed a temporary folder left by an interrupted run: {path}")
    source = Source(manifest, options.against)
    reads = [out, manifest_path(out), *(p for p in (options.report,) if p), *source.files]
    for option, path in (reports or {}).items():
        check_report_path(path, option, reads=reads, writes=[dst], overwrite=options.overwrite)
    source.start()
    try:
        try:
            validation = validation_summary(out, manifest, options, progress)
        except ValidationFailed:
            source.check()      # another checkpoint than the source explains a failed validation: say that
            raise
        source.check()
    finally:
        source.close()
    with TempFolder(dst) as folder:
        try:
            digests = place_files(listed, folder.path, options.link, result.notes, progress)
            check_output_hashes(out, listed, digests)
            for name, path in source.license_files(exclude=set(digests)):
                digests[name] = place(path, os.path.join(folder.path, name), False)
            prov = record(out, dst, manifest, options, source, validation, folder.path, digests)
            if prov["base_model"] and not options.base_model:
                result.notes.append(f"base model {prov['base_model'][0]}, from {prov['base_model_from']}")
            for w in _warnings(prov, source, manifest):
                warn(w)
            prov["warnings"] = list(result.warnings)
            digests[PROVENANCE_NAME] = write_atomic(os.path.join(folder.path, PROVENANCE_NAME),
                                                    (json.dumps(prov, indent=2, ensure_ascii=False) + "\n").encode())
            digests[CARD_NAME] = write_atomic(os.path.join(folder.path, CARD_NAME), card.render(prov).encode())
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


def _warnings(prov: dict, source: Source, manifest: dict) -> list[str]:
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
