"""Errors a user can act on.

An :class:`AuditError` is raised for bad input (a model, data set, policy or
flag). The CLI prints its message as one line and exits with code 2; the
Python API lets it propagate.
"""


class AuditError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""
