"""Validity checks with stable ids (after AutoAttack's ``checks.py`` and
Carlini et al., "On Evaluating Adversarial Robustness", 2019).

Each check has an id that never changes, a level (info < warning < error)
and a paragraph in ``docs/checks.md`` under the same id. Policies cite the
level (``no_checks_at: warning``); the report links each id to its paragraph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .access import Access
from .models.base import Model

LEVELS = ("info", "warning", "error")


@dataclass(frozen=True)
class Check:
    id: str
    level: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


RANDOMISED_MODEL = "randomised-model"
SOFTMAX_OUTPUTS = "softmax-outputs"
LOW_CLEAN_ACCURACY = "low-clean-accuracy"
ATTACK_SKIPPED = "attack-skipped"
ACCESS_LIMITED = "access-limited"

LOW_CLEAN_ACCURACY_BELOW = 0.5


def preflight(model: Model, x: torch.Tensor) -> tuple[list[Check], bool]:
    """Checks that need the model: run before the battery.

    Returns the checks that fired and whether the outputs are probabilities.
    """
    checks = []
    batch = x.to(model.device)
    first, second = model.forward(batch), model.forward(batch)
    if not torch.allclose(first, second, rtol=1e-4, atol=1e-5):
        checks.append(Check(
            RANDOMISED_MODEL, "warning",
            "two identical forward passes gave different outputs: the model is randomised, "
            "and attacks without expectation over its randomness overstate robustness",
        ))
    sums = first.sum(dim=1)
    probabilities = bool((first >= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-3))
    if probabilities:
        checks.append(Check(
            SOFTMAX_OUTPUTS, "warning",
            "the model outputs probabilities, not logits: saturated softmax can mask gradients "
            "and weaken gradient-based attacks",
        ))
    return checks, probabilities


def low_clean_accuracy(clean_accuracy: float) -> list[Check]:
    if clean_accuracy >= LOW_CLEAN_ACCURACY_BELOW:
        return []
    return [Check(
        LOW_CLEAN_ACCURACY, "warning",
        f"clean accuracy is {clean_accuracy:.1%}: check that the data matches the model "
        "(labels, channel order, --mean/--std)",
    )]


def skipped_attacks(skipped: Sequence[tuple[str, str]]) -> list[Check]:
    return [
        Check(ATTACK_SKIPPED, "info", f"{label} was not run: {reason}")
        for label, reason in skipped
    ]


def access_limited(level: Access, reason: str) -> list[Check]:
    if level == Access.WHITE_BOX:
        return []
    return [Check(
        ACCESS_LIMITED, "info",
        f"the audit ran at {level.cli_name} access ({reason}); "
        "attackers with more access were not evaluated",
    )]
