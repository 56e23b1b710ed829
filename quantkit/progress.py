"""Progress reporting without printing: the library calls a Progress, the CLI draws it."""
from __future__ import annotations


class Progress:
    """Receives progress from long work. The default does nothing; the CLI passes a tqdm one."""

    def stage(self, name: str, total_bytes: int) -> None:
        """A new stage starts (e.g. 'calibrate', 'quantize'), ``total_bytes`` of work."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more of the current stage are done."""

    def close(self) -> None:
        """All stages are done."""

    def warn(self, message: str) -> None:
        """Something the user should know; not an error."""


NULL = Progress()
