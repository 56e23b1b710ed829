"""One exception hierarchy. Every message is one line naming the file, the tensor and the fix.

The CLI maps ``exit_code`` to the process exit status: 2 for bad input or usage,
1 for a validation that ran and failed.
"""
from __future__ import annotations

import os


class QuantkitError(Exception):
    """Base class: anything quantkit refuses, with a message a user can act on."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 tensor: str | None = None, hint: str | None = None):
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}:")
        if self.tensor is not None:
            parts.append(f"tensor '{self.tensor}':")
        parts.append(self.message)
        line = " ".join(parts)
        if self.hint:
            line += f" ({self.hint})"
        return line.replace("\n", " ")

    def __reduce__(self):
        # Rebuilt with its fields (a worker process hands its error to the parent by pickling it;
        # the default would rebuild it from the one-line string, path and hint folded in).
        return _rebuild, (type(self), self.message, self.path, self.tensor, self.hint)


def _rebuild(cls, message, path, tensor, hint):
    return cls(message, path=path, tensor=tensor, hint=hint)


class HeaderError(QuantkitError):
    """A safetensors header that is malformed, hostile or inconsistent with the file."""


class UnsupportedInputError(QuantkitError):
    """A well-formed input that quantkit cannot convert (dtype, layout, already FP8)."""


class NonFiniteError(QuantkitError):
    """NaN or Inf in a tensor that is to be quantized."""


class ModelMismatchError(QuantkitError):
    """A checkpoint whose tensors do not fit the module it is loaded into (names or shapes)."""


class PolicyError(QuantkitError):
    """A policy rule or option that cannot be applied."""


class OptionsError(QuantkitError):
    """An option value that means nothing (an unknown FP8 dtype, a size that is not one)."""


class FormatError(QuantkitError):
    """A file that breaks the conventions of the format it is in (a scale without a weight, a
    marker that does not parse): raised by every format's read-back, and caught alone."""


class OutputError(QuantkitError):
    """The destination cannot be written: exists, is the source, disk full, I/O error."""


class ValidationFailed(QuantkitError):
    """Validation ran and the output did not meet the bar (hash mismatch, low SQNR, missing tensors)."""

    exit_code = 1
