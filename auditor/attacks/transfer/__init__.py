"""Transfer attacks from surrogate models (access ``none``): transforms over one I-FGSM core.

:data:`METHODS` is the transfer part of the catalogue. Its default set,
the one an audit runs, goes cheapest first: plain
I-FGSM, then each transform alone on it (MI, NI, DI, TI, SI, VT, Admix),
then combinations of the literature, and RAP last, the costliest. Every
transform keeps its papers' defaults (T = 10, α = ε/T, μ = 1, p = 0.5, a 7×7
kernel, 5 scale copies, N = 20 and β = 1.5, 3 admixed copies with η = 0.2).
A method costs surrogate gradient batches per step: 1 for I-FGSM, MI, NI,
DI and TI, 5 for SI, 3 for Admix, 21 for VT, and the product for a
combination. VMI-DI-TI-SI-Admix would take 21·5·3 = 315 per step, and SI
did not improve transfer to the example MNIST model (at ε = 0.15 it
lowered it from every surrogate set), so the set holds MI-DI-TI,
MI-DI-TI-Admix and VMI-DI-TI.

RAP runs on MI-DI-TI with the paper's schedule shrunk twentyfold: the paper
takes K = 400 steps of α = ε/8 with a late start K_LS = 100 (RAP-LS); here
K = 20 and K_LS = 5, the same step size and the same K_LS/K, with the
paper's inner maximisation (8 steps within ε_n = 16/255): 20 + 15·8 = 140
gradient batches, against 10 for MI-DI-TI. On the example MNIST model RAP
was within one point of the same schedule without it at K = 20, 40 and
100 (200 images, ε = 0.3 from the ResNet surrogate and ε = 0.15 from the
ensemble); it stays for models where the flat-region search pays.

Two more run only when ``--attacks`` names them (:class:`OnRequest`), so
that a default scan is no slower: MI-DI-TI with the logit loss of Zhao et
al. (2021), made for targeted transfer (``transfer-mi-di-ti-logit``), and
RAP without the late start (K_LS = 0, the paper's plain RAP, labelled
``transfer-mi-di-ti-rap-no-ls``): 20 + 20·8 = 180 gradient batches.
"""

from dataclasses import dataclass
from typing import ClassVar

from .admix import Admix
from .diverse_inputs import DiverseInputs
from .mi_fgsm import MomentumIterative
from .nesterov import Nesterov
from .rap import ReverseAdversarialPerturbation
from .scale_invariance import ScaleInvariance
from .transfer_attack import TransferAttack
from .translation_invariance import TranslationInvariance
from .variance_tuning import VarianceTuning

_MI, _DI, _TI = MomentumIterative(), DiverseInputs(), TranslationInvariance()
_RAP_SCHEDULE = {"steps": 20, "rel_step": 1 / 8}
"""K = 20 outer steps of α = ε/8: the paper's schedule shrunk twentyfold."""


@dataclass(frozen=True)
class OnRequest(TransferAttack):
    """A transfer method outside the default battery: it runs only when ``--attacks`` names it."""

    in_default_battery: ClassVar[bool] = False
    suffix: str = ""
    """Put before the norm in the label, to tell it from a default method with the same transforms."""

    @property
    def label(self) -> str:
        head, norm = super().label.rsplit("-", 1)
        return f"{head}{self.suffix}-{norm}"


METHODS: tuple[TransferAttack, ...] = (
    TransferAttack(),
    TransferAttack((_MI,)),
    TransferAttack((Nesterov(),)),
    TransferAttack((_DI,)),
    TransferAttack((_TI,)),
    TransferAttack((ScaleInvariance(),)),
    TransferAttack((VarianceTuning(),)),
    TransferAttack((Admix(),)),
    TransferAttack((_DI, _TI, _MI)),
    TransferAttack((Admix(), _DI, _TI, _MI)),
    TransferAttack((_DI, VarianceTuning(), _TI, _MI)),
    TransferAttack((_DI, _TI, _MI, ReverseAdversarialPerturbation(late_start=5)), **_RAP_SCHEDULE),
    OnRequest((_DI, _TI, _MI), loss="logit"),
    OnRequest((_DI, _TI, _MI, ReverseAdversarialPerturbation(late_start=0)), **_RAP_SCHEDULE, suffix="-no-ls"),
)

__all__ = [
    "METHODS",
    "Admix",
    "DiverseInputs",
    "MomentumIterative",
    "Nesterov",
    "OnRequest",
    "ReverseAdversarialPerturbation",
    "ScaleInvariance",
    "TransferAttack",
    "TranslationInvariance",
    "VarianceTuning",
]
