"""Errors a user can act on.

An :class:`AuditError` is raised for bad input (a model, data set, policy or
flag). The CLI prints its message as one line and exits with code 2; the
Python API lets it propagate.
"""


class AuditError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """The text of ``exc`` on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
