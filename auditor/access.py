"""Access levels and the threat model they imply.

The levels are ordered ``white-box > soft-label > hard-label > none``. An
attacker with more access can do everything a weaker one can, so the battery
for a level runs the attacks of that level and of every weaker one.
"""

from __future__ import annotations

import enum

from .errors import AuditError

DEFAULT_BUDGET = 5000
"""Queries per sample for each black-box attack run: AutoAttack's budget for
its Square Attack, so a white-box audit's gradient-free checks are as strong
as AutoAttack's."""
MAX_BUDGET = 2**62
"""The largest budget: query counts are int64 tensors, and 2**62 already stands for unlimited."""

class Access(enum.IntEnum):
    NONE = 0
    HARD_LABEL = 1
    SOFT_LABEL = 2
    WHITE_BOX = 3

    @property
    def cli_name(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, text: str) -> "Access":
        for level in cls:
            if level.cli_name == text:
                return level
        names = ", ".join(level.cli_name for level in cls)
        raise AuditError(f"unknown access level {text!r}; expected auto or one of: {names}")


def resolve_access(requested: str, ceiling: Access, ceiling_reason: str) -> tuple[Access, str]:
    """Pick the access level of a scan and say why.

    ``ceiling`` is the highest level the model artifact allows (for example an
    ONNX graph that cannot be converted for gradients allows soft-label at most).
    """
    if requested == "auto":
        return ceiling, f"auto: {ceiling_reason}"
    level = Access.parse(requested)
    if level > ceiling:
        raise AuditError(
            f"--access {level.cli_name} is not possible for this model: {ceiling_reason}"
        )
    return level, f"requested with --access {level.cli_name}"
