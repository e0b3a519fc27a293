"""The attack catalogue: every attack the auditor can run, in battery order.

Order follows cost and strength, as in AutoAttack: white-box first (APGD-CE,
then targeted APGD), then soft-label, then hard-label, then the transfer
attacks (they use only surrogate models, so they run at every access level
when surrogates are given), and random noise last as the sanity baseline.
Attacks with ``in_default_battery = False`` (FGSM, PGD, C&W, APGD-DLR, OPT)
run only when named with ``--attacks``; ``default_up_to`` is the strongest
access level whose default battery runs an attack (soft-label for NES,
GenAttack and HopSkipJump, hard-label for Sign-OPT). Entries are immutable, so sharing one
instance is safe.
"""
from __future__ import annotations

import dataclasses

from .base import Attack, AttackResult
from .hardlabel.hop_skip_jump import HopSkipJump
from .hardlabel.opt import OPT
from .hardlabel.random_noise import RandomNoise
from .hardlabel.sign_opt import SignOPT
from .softlabel.gen_attack import GenAttack
from .softlabel.nes import NES
from .softlabel.square import SquareAttack
from .transfer import METHODS as TRANSFER_METHODS
from .whitebox.apgd import APGD
from .whitebox.apgd_t import APGDTargeted
from .whitebox.carlini_wagner import CarliniWagnerL2
from .whitebox.fgsm import FGSM
from .whitebox.pgd import PGD

CATALOGUE: tuple[Attack, ...] = (
    # Five random starts, as in AutoAttack's plus version (its standard
    # version has one): on samples near the boundary each start is close to
    # a coin flip, and the extra starts, on the samples still robust, cost
    # far less than APGD-T's nine targets.
    APGD(norm="linf", loss="ce", restarts=5),
    APGD(norm="l2", loss="ce", restarts=5),
    APGDTargeted(norm="linf"),
    APGDTargeted(norm="l2"),
    APGD(norm="linf", loss="dlr"),
    APGD(norm="l2", loss="dlr"),
    FGSM(norm="linf"),
    FGSM(norm="l2"),
    PGD(norm="linf"),
    PGD(norm="l2"),
    CarliniWagnerL2(),
    SquareAttack(norm="linf"),
    SquareAttack(norm="l2"),
    NES(norm="linf"),
    NES(norm="l2"),
    GenAttack(norm="linf"),
    SignOPT(norm="l2"),
    SignOPT(norm="linf"),
    HopSkipJump(norm="l2"),
    HopSkipJump(norm="linf"),
    OPT(norm="l2"),
    OPT(norm="linf"),
    *TRANSFER_METHODS,
    *(dataclasses.replace(method, norm="l2") for method in TRANSFER_METHODS),
    RandomNoise(norm="linf"),
    RandomNoise(norm="l2"),
)

BY_LABEL: dict[str, Attack] = {attack.label: attack for attack in CATALOGUE}

__all__ = ["Attack", "AttackResult", "CATALOGUE", "BY_LABEL"]
