"""The attack catalogue: every attack the auditor can run, in battery order.

Order follows cost, as in AutoAttack: white-box first, then soft-label, then
hard-label. Entries are immutable, so sharing one instance is safe.
"""

from __future__ import annotations

from .base import Attack, AttackResult
from .hardlabel.sign_opt import SignOPT
from .softlabel.square import SquareAttack
from .whitebox.pgd import PGD

CATALOGUE: tuple[Attack, ...] = (
    PGD(norm="linf"),
    PGD(norm="l2"),
    SquareAttack(norm="linf"),
    SignOPT(norm="l2"),
)

BY_LABEL: dict[str, Attack] = {attack.label: attack for attack in CATALOGUE}

__all__ = ["Attack", "AttackResult", "CATALOGUE", "BY_LABEL"]
