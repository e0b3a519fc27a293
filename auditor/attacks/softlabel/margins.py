"""Log-probability margins, the loss the soft-label attacks share.

A soft-label attacker sees probabilities only; the margin between the log
probability of one class and the largest of the others is the logit margin
of [CW17] (softmax keeps logit differences), computed from what it sees.
"""

from __future__ import annotations

import torch


def log_margin(logp: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, ``(log p_c, max_{j≠c} log p_j)`` for the class ``c = cls[row]``,
    from log-probabilities (``ScoreOracle.log_probs``: finite, so a
    saturated output gives a large finite margin rather than infinity)."""
    own = logp.gather(1, cls[:, None]).squeeze(1)
    others = logp.scatter(1, cls[:, None], float("-inf")).amax(dim=1)
    return own, others
