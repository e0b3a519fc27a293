"""The configuration of one hardening run, validated once.

Defaults follow Wong, Rice and Kolter, "Fast is better than free: revisiting
adversarial training", ICLR 2020 (their MNIST setting: Adam, a triangular
cyclic learning rate up to 5e-3 peaking at 2/5 of training), adapted to
fine-tuning a trained model on a small data set, as measured on the built-in
MNIST split (4,000 digits; ``bench/harden.py``): ε ramps up over the first
40 % of the updates, 20 epochs of batch 50 (Wong et al. have 60,000 digits,
10 epochs of batch 100: 6,000 updates against our 1,500), and the training
adversary is not clipped to [0,1]; ``fast`` trains at 1.2·ε with α = 1.5
(see :mod:`.fast_at`). Step sizes and radii are relative to ε, so no radius
is built in.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

from ..attacks.base import MAX_SEED
from ..eps import check_radius
from ..errors import AuditError

NORMS = ("linf", "l2")

METHOD_OPTIONS = {
    "random_init": ("fast", "--zero-init", True),
    "steps": ("pgd", "--steps", 40),
    "replays": ("free", "--replays", 8),
}
"""Settings only one method uses: field -> (method, CLI flag, default)."""


_KINDS = {"int": numbers.Integral, "float": numbers.Real, "bool": bool}
_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false"}


@dataclass(frozen=True)
class HardenConfig:
    """Everything that decides what a hardening run computes (times aside).

    The settings of :data:`METHOD_OPTIONS` are refused for the other methods;
    :meth:`setting` reads the chosen method's own, with its default when not
    given, and the record holds None for the others (not applying).
    """

    eps: float
    """Training radius in ``norm`` (pixel space, [0,1] images)."""
    norm: str = "linf"
    method: str = "fast"
    """A key of :data:`auditor.harden.methods.METHODS`: ``fast``, ``pgd`` or ``free``."""
    epochs: int = 20
    """Passes over the training data (``free`` makes ``⌈epochs/m⌉`` passes of m replays each)."""
    batch_size: int = 50
    lr_max: float = 5e-3
    """Peak learning rate of the triangular cycle (Adam), Wong et al.'s MNIST value."""
    lr_peak: float = 0.4
    """Where the cycle peaks, as a fraction of all updates (Wong et al.: 2/5)."""
    eps_warmup: float = 0.4
    """Fraction of the updates over which ε ramps linearly from 0 to ``eps`` (0: none)."""
    alpha: float | None = None
    """Attack step size as a multiple of the training radius; ``None``: the method's default."""
    eps_scale: float | None = None
    """Training radius as a multiple of ``eps`` (the guard and the scans stay at ``eps``);
    ``None``: the method's default (``fast`` 1.2, ``pgd`` and ``free`` 1)."""
    clip_to_box: bool = False
    """Whether the training adversary's images are clipped to [0,1]. Off by default: measured on the
    built-in MNIST at ε = 0.3, FGSM-RS fine-tuning with clipped perturbations masks gradients (about
    10 % PGD-50-10 accuracy against 54 % unclipped, 10 epochs); evaluation always stays in [0,1]."""
    random_init: bool | None = None
    """``fast`` only: start FGSM from a uniform point of the ε-ball (False: from zero); default True."""
    steps: int | None = None
    """``pgd`` only: attack steps per batch; default 40 (Madry et al.'s MNIST setting)."""
    replays: int | None = None
    """``free`` only: replays m of each minibatch; default 8 (Shafahi et al.)."""
    guard: bool = True
    guard_size: int = 256
    """Training images held out for the guard's PGD check."""
    guard_steps: int = 10
    guard_every: int = 200
    """Updates between guard checks inside an epoch longer than this (epoch ends are always checked)."""
    guard_drop: float = 0.2
    """Roll back and stop when guard PGD accuracy falls more than this below its best."""
    seed: int = 0

    def __post_init__(self):
        self._check_types()
        if self.norm not in NORMS:
            raise AuditError(f"unknown norm {self.norm!r}; use linf or l2")
        check_radius(self.eps, self.norm)
        for field, (method, flag, _) in METHOD_OPTIONS.items():
            if self.method != method and getattr(self, field) is not None:
                raise AuditError(f"{flag} applies to --method {method} only, not {self.method}")
        positive = {"--epochs": self.epochs, "--batch-size": self.batch_size, "--steps": self.setting("steps"),
                    "--replays": self.setting("replays"), "--guard-steps": self.guard_steps,
                    "--guard-every": self.guard_every}
        positive = {flag: value for flag, value in positive.items() if value is not None}
        for flag, value in positive.items():
            if value < 1:
                raise AuditError(f"{flag} must be >= 1, got {value}")
        if not 0 <= self.seed <= MAX_SEED:
            raise AuditError(f"--seed must be between 0 and 2^63 - 1, got {self.seed}")
        if self.guard_size < 1:  # with --no-guard too: its images still measure the training curve
            raise AuditError(f"--guard-size must be >= 1, got {self.guard_size}")
        finite_positive = {"--lr-max": self.lr_max, "--alpha": self.alpha, "--eps-scale": self.eps_scale}
        for flag, value in finite_positive.items():
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise AuditError(f"{flag} must be a finite number > 0, got {value:g}")
        if not 0 < self.lr_peak < 1:
            raise AuditError(f"--lr-peak must lie strictly between 0 and 1, got {self.lr_peak:g}")
        if not 0 <= self.eps_warmup <= 1:
            raise AuditError(f"--eps-warmup must lie in [0, 1], got {self.eps_warmup:g}")
        if not 0 < self.guard_drop <= 1:
            raise AuditError(f"--guard-drop must lie in (0, 1], got {self.guard_drop:g}")

    def _check_types(self) -> None:
        """Each number and switch of the right kind (the Python API takes
        them unparsed): ``lr_max="fast"`` is refused here, not deep in training."""
        for field in fields(self):
            kind = field.type.removesuffix(" | None")
            expected = _KINDS.get(kind)
            value = getattr(self, field.name)
            if expected is None or (value is None and field.type.endswith("| None")):
                continue
            if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                flag = "--" + field.name.replace("_", "-")
                raise AuditError(f"{flag} must be {_KIND_NAMES[kind]}, got {value!r}")

    def setting(self, field: str):
        """A :data:`METHOD_OPTIONS` setting: as given, else its default for
        the method that uses it, else None (it does not apply)."""
        method, _, default = METHOD_OPTIONS[field]
        value = getattr(self, field)
        return default if value is None and self.method == method else value

    def to_dict(self) -> dict:
        return {**asdict(self), **{field: self.setting(field) for field in METHOD_OPTIONS}}
