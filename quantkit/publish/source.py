"""The source checkpoint a release is published against (``publish --against``): its hashes
checked against the manifest, its license files and model card carried over, and where the id of
the original model can be read (a Hugging Face cache path, a card, a config).
"""
from __future__ import annotations

import os
import re

from ..errors import UnsupportedInputError
from ..hashing import BackgroundHash
from ..jsonfiles import JSONFileError, read_json
from .card import read_front_matter
from .release import CARD_NAME, LICENSE_FILE, source_files, source_mismatches

_HF_CACHE = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+(?:/|$)")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")    # ORG/NAME on the Hugging Face Hub


class Source:
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
                if LICENSE_FILE.fullmatch(name) and os.path.isfile(os.path.join(folder, name)) \
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
                    fields = read_front_matter(f.read(1 << 20).decode("utf-8", errors="replace"))
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
                config = read_json(os.path.join(folder, "config.json"), 1 << 20)
            except (OSError, JSONFileError):
                continue
            named = config.get("_name_or_path") if isinstance(config, dict) else None
            if isinstance(named, str) and _HUB_ID.fullmatch(named) and not os.path.exists(named):
                return named, "the _name_or_path of the source's config.json", False
        return None
