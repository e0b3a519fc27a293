"""The losses of the transfer attacks, as the per-sample loss of a label.

* ``ce``: cross-entropy −log softmax(z)_c, the loss of I-FGSM and MI-FGSM
  (Kurakin et al. 2017; Dong et al. 2018, J in Eq. 1);
* ``logit``: −z_c, the logit loss of Zhao, Liu and Larson, "On Success and
  Simplicity: A Second Look at Transferable Targeted Attacks", NeurIPS 2021
  (§3, the negative target logit), which does not saturate the way
  cross-entropy does and so keeps pushing a targeted example deeper into
  its target class.

The attack ascends the loss of the true label (untargeted) or descends the
loss of the target (targeted); see :class:`.TransferAttack`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

LabelLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _negative_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -logits.gather(1, labels.unsqueeze(1)).squeeze(1)


LOSSES: dict[str, LabelLoss] = {"ce": _cross_entropy, "logit": _negative_logit}
"""name → loss(logits (M,K), labels (M,)) → (M,)."""
