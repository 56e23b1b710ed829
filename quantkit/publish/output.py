"""The output a release is made from: its manifest (checked to be as ``quantkit convert`` writes
it), its files, and placing them into the release folder (copied and hashed in one read, or
hard-linked), then checked against the manifest's SHA256.
"""
from __future__ import annotations

import errno
import hashlib
import os

from ..errors import OutputError, UnsupportedInputError, ValidationFailed
from ..hashing import READ_BYTES, sha256_file
from ..manifest import manifest_path, read_manifest
from ..progress import Progress
from .release import CARD_NAME, RESERVED, file_role, safe_name


def read_output_manifest(out: str) -> dict:
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


def output_files(out: str, manifest: dict, notes: list[str]) -> list[tuple[str, str, dict]]:
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
    if not any(file_role(n) == "weights" for n, _, _ in files):
        raise UnsupportedInputError("the manifest lists no weight file", path=manifest_path(out),
                                    hint="re-run quantkit convert to rewrite it")
    return files


def place_files(listed, folder: str, link: bool, notes: list[str], progress: Progress) -> dict[str, str]:
    digests, copied = {}, []
    progress.stage("publish", sum(os.path.getsize(path) for _, path, _ in listed))
    for name, path, _ in listed:
        digests[name] = place(path, os.path.join(folder, *name.split("/")), link, progress.advance)
        if link and not os.path.samefile(path, os.path.join(folder, *name.split("/"))):
            copied.append(name)
    if link and copied:
        notes.append(f"copied instead of hard-linked (another file system?): {', '.join(copied)}")
    return digests


def place(src: str, dst: str, link: bool, advance=lambda n: None) -> str:
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


def check_output_hashes(out: str, listed, digests: dict[str, str]) -> None:
    bad = [(name, path, entry["sha256"]) for name, path, entry in listed if digests[name] != entry["sha256"]]
    if bad:
        raise ValidationFailed("; ".join(f"{path}: sha256 {digests[n][:16]}... does not match the manifest's "
                                         f"{sha[:16]}..." for n, path, sha in bad), path=None,
                               hint="the output was modified or corrupted since quantkit convert wrote it; "
                                    "re-run convert; nothing was published")
