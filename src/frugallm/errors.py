"""User-facing errors.

Every problem a user can cause (bad path, corrupt file, invalid sampling value) raises a subclass of
:class:`FrugalError` with a message that names the problem; the CLI turns these into one-line messages
and a non-zero exit instead of a traceback. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class FrugalError(ValueError):
    """Base class of errors caused by user input (files, options, prompts)."""


class ModelLoadError(FrugalError):
    """A model path or file cannot be loaded (missing, corrupt, unsupported)."""


class InvalidRequestError(FrugalError):
    """A request (prompt, sampling parameters) is invalid; ``param`` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TemplateError(FrugalError):
    """A chat template failed to render or tried to escape the sandbox."""
