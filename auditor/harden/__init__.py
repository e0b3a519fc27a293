"""Hardening: adversarial fine-tuning with a guard against catastrophic overfitting.

``auditor.harden(model, data, eps=..., out=...)`` trains with fast
adversarial training (FGSM with a random start, Wong et al., ICLR 2020) by
default, PGD training (Madry et al., ICLR 2018) or free training (Shafahi
et al., NeurIPS 2019), and writes the model back in its own format with a
before/after scan and a report. See :mod:`auditor.harden.api`.
"""

from .api import HardenResult, harden
from .config import HardenConfig
from .methods import METHODS

__all__ = ["METHODS", "HardenConfig", "HardenResult", "harden"]
