"""The guard against catastrophic overfitting.

Wong, Rice and Kolter, "Fast is better than free", ICLR 2020: FGSM
training can suddenly lose all robustness to PGD within an epoch
("catastrophic overfitting") while its accuracy against FGSM itself stays
high. Their remedy is early stopping on a PGD check of a training minibatch;
Rice, Wong and Kolter, "Overfitting in adversarially robust deep learning"
(ICML 2020) likewise keep the checkpoint of best robust accuracy.

The guard holds out a batch of the training data. At each check it measures
clean, FGSM and PGD accuracy on it (the real :class:`~auditor.attacks.whitebox.pgd.PGD`,
random start and steps of 2.5·ε/k as in Madry et al.'s robustness library,
and :class:`~auditor.attacks.whitebox.fgsm.FGSM` attacks, through a
:class:`~auditor.oracles.GradientOracle`, with a fixed seed), keeps a copy of
the weights with the best PGD accuracy, and trips when PGD accuracy falls
more than ``guard_drop`` (Wong et al.'s 0.2) below that best: the best
weights are restored and training stops. Disabled (``--no-guard``), it still
measures and records the first collapse, but acts on nothing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..attacks.whitebox.fgsm import FGSM
from ..attacks.whitebox.pgd import PGD
from ..oracles import GradientOracle

log = logging.getLogger(__name__)

CHECK_SEED = 0
"""The attacks' seed at every check, so that checks of the same weights agree."""


def _round(value: float) -> float:
    return round(float(value), 6)


@dataclass(frozen=True)
class Check:
    """Accuracies on the guard batch after ``iteration`` updates, in ``epoch``."""

    epoch: int
    iteration: int
    clean: float
    fgsm: float
    pgd: float

    def accuracies(self) -> dict:
        return {"clean": self.clean, "fgsm": self.fgsm, "pgd": self.pgd}

    def to_dict(self) -> dict:
        return asdict(self)


class Guard:
    """Checks on a held-out batch, the best weights so far, and the rollback rule."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, steps: int,
                 drop: float, enabled: bool):
        self.x, self.y = x, y
        self.eps = eps
        self.enabled = enabled
        self.drop = drop
        self.fgsm = FGSM(norm=norm)
        self.pgd = PGD(norm=norm, steps=steps, rel_step=2.5 / steps)
        self.best: Check | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self.checks: list[Check] = []
        self.events: list[dict] = []

    @property
    def params(self) -> dict:
        return {"enabled": self.enabled, "batch": len(self.y), "drop": self.drop,
                "attack": {"name": self.pgd.label, "steps": self.pgd.steps, "rel_step": self.pgd.rel_step}}

    def _accuracy(self, attack, module: nn.Module) -> float:
        oracle = GradientOracle(module, len(self.y), device=self.x.device)
        result = attack(oracle, self.x, self.y, eps=self.eps, seed=CHECK_SEED)
        with torch.no_grad():
            robust = module(result.x_adv).argmax(1) == self.y
        return _round(robust.double().mean())

    def measure(self, module: nn.Module, epoch: int, iteration: int) -> Check:
        """Clean, FGSM and PGD accuracy of ``module`` (put in eval mode) on the guard batch."""
        module.eval()
        with torch.no_grad():
            clean = _round((module(self.x).argmax(1) == self.y).double().mean())
        fgsm, pgd = self._accuracy(self.fgsm, module), self._accuracy(self.pgd, module)
        check = Check(epoch, iteration, clean, fgsm, pgd)
        self.checks.append(check)
        return check

    def observe(self, module: nn.Module, check: Check) -> bool:
        """Keep the best weights, or trip: restore them and return True (stop training).

        Trips when PGD accuracy falls more than ``drop`` below the best seen
        (Wong et al.'s early-stopping rule). Disabled, it records the first such fall and never stops.
        """
        if self.best is None or check.pgd > self.best.pgd:
            self.best = check
            self._best_state = {key: value.detach().clone() for key, value in module.state_dict().items()}
            return False
        if check.pgd >= self.best.pgd - self.drop:
            return False
        if not self.enabled:
            if not any(event["kind"] == "collapse" for event in self.events):
                self._event("collapse", "none (guard disabled)", check,
                            f"PGD accuracy fell from {self.best.pgd:.3f} to {check.pgd:.3f}; guard disabled")
            return False
        self._restore(module)
        best = self.best
        self._event("collapse", "rollback", check,
                    f"PGD accuracy fell from {best.pgd:.3f} (epoch {best.epoch}) to {check.pgd:.3f}: "
                    f"restored the weights of epoch {best.epoch}, iteration {best.iteration}, and stopped")
        return True

    def non_finite(self, module: nn.Module, epoch: int, iteration: int) -> None:
        """The training loss became NaN or infinite: restore the best weights (guard on or off)."""
        self._restore(module)
        best = self.best
        self.events.append({
            "kind": "non-finite-loss", "action": "rollback", "epoch": epoch, "iteration": iteration,
            "pgd": None, "best_pgd": best.pgd, "best_epoch": best.epoch, "best_iteration": best.iteration,
            "message": f"non-finite training loss: restored the weights of epoch {best.epoch} and stopped",
        })
        log.warning("harden: %s", self.events[-1]["message"])

    def _restore(self, module: nn.Module) -> None:
        module.load_state_dict(self._best_state)

    def _event(self, kind: str, action: str, check: Check, message: str) -> None:
        self.events.append({
            "kind": kind, "action": action, "epoch": check.epoch, "iteration": check.iteration,
            "pgd": check.pgd, "best_pgd": self.best.pgd, "best_epoch": self.best.epoch,
            "best_iteration": self.best.iteration, "message": message,
        })
        log.warning("harden guard: %s", message)
