"""Errors a user can act on.

An :class:`AuditError` is raised for bad input (a model, data set, policy or
flag). The CLI prints its message as one line and exits with code 2; the
Python API lets it propagate.
"""

import re

_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
"""C0 and C1 controls (tab aside), and the invisible Unicode marks that reorder or hide text:
zero-width characters, line and paragraph separators, bidirectional embeddings, overrides
and isolates (after a right-to-left override, ``lmay.exe`` shows as ``exe.yaml``), byte-order mark."""


class AuditError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """The text of ``exc`` on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """``text`` with its control and invisible characters shown as escapes (``\\x1b``, ``\\u202e``),
    so that text from an input file can neither drive the terminal nor break the line."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)
