"""Verification of adversarial examples on the real runtime.

The harness never trusts an attack's ``success`` mask. Every candidate is
clipped to [0,1], sent through the model adapter's ``forward`` (for an ONNX
file that is the onnxruntime session, not a converted torch copy) and counts
only if it is finite and misclassified (in a targeted audit: classified as
its target). An output row with a NaN score names no class (``argmax`` would
return the NaN's index): it is misclassified, and never on target. Its distortion is measured in the
threat norm, whatever norm the attack itself optimised.

A randomised model (``randomised-model``) gives a label per draw of its
randomness, and one draw that happens to be wrong proves little. Its
prediction is then the label it gives most often over :data:`VOTES` passes
(:func:`predict`), for the clean images as for the candidates: the classifier
an owner deploying it would measure, and the rule of randomised-smoothing
evaluations (Cohen et al., 2019).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attacks.base import distortion, labels_of, most_frequent
from .models.base import Model

EPS_ATOL = 1e-6
EPS_RTOL = 1e-5
"""Slack allowed at the ε boundary for float32 round-off: ``1e-6 + 1e-5·ε``.
A float32 projection onto an L2 sphere lands up to about 1e-6·ε outside it
on large inputs (its norm is summed in float32 over C·H·W entries: 4e-6 at
ε = 3 on 3 × 224 × 224), so an absolute slack alone would reject in-ball
examples there."""


def eps_bound(eps: float) -> float:
    """The largest distortion that counts as within ε."""
    return eps + EPS_ATOL + EPS_RTOL * eps


@dataclass(frozen=True)
class Verified:
    x_adv: torch.Tensor
    """The clipped candidates (CPU)."""
    fooled: torch.Tensor
    """(N,) bool: finite and misclassified (or on target) on the real runtime."""
    distortion: torch.Tensor
    """(N,) float64 distortion in the threat norm."""


VOTES = 21
"""Passes whose most frequent label is a randomised model's prediction (odd:
a model random between two answers never ties)."""

BLACK_BOX_PASSES = 5
"""Passes that answer each query of a black-box attack on a randomised
model: their most frequent label (:func:`voted_labels`), or their mean
probabilities (:func:`mean_probabilities`). Each answer costs that many
queries. Single passes send the attacks after lucky draws; on the example
CNN behind Gaussian input noise (σ = 0.05 and 0.2, 32 digits, L2 ε = 1 / 1.5
/ 2, budget 5,000) hard-label robust accuracy came out 97 / 97 / 97 % with
them. 3, 5 and 9 passes did about as well as each other, and 21 (as
verification takes) worse: its 238 answers are too few for HopSkipJump."""


def voted_labels(labels: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, votes: int) -> torch.Tensor:
    """(N,) labels of ``x``: the one strictly more of ``votes`` calls of
    ``labels`` (a pass's top-1 labels, -1 for a NaN row) give than any other,
    or -1 where labels tie for the most (no answer: the image is neither
    classified correctly nor as a target)."""
    if len(x) == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    return most_frequent(torch.stack([labels(x) for _ in range(votes)]))


def mean_probabilities(
    probabilities: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, votes: int
) -> torch.Tensor:
    """The mean of ``votes`` calls of ``probabilities`` on ``x``: what a
    score attacker averages a randomised model's answers over."""
    return torch.stack([probabilities(x).float() for _ in range(votes)]).mean(dim=0)


def predict(model: Model, x: torch.Tensor, votes: int = 1) -> torch.Tensor:
    """(N,) CPU labels of ``x``: the label of one pass, or with ``votes`` > 1
    the label strictly more passes give than any other (:func:`voted_labels`)."""
    x = x.to(model.device)
    if votes == 1:
        return labels_of(model.forward(x)).cpu()
    return voted_labels(lambda batch: labels_of(model.forward(batch)), x, votes).cpu()


def verify(
    model: Model,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    target: torch.Tensor | None = None,
    votes: int = 1,
) -> Verified:
    """Re-check candidate adversarial examples ``x_adv`` for clean images ``x``
    (a randomised model's label: the one most of ``votes`` passes give, see
    :func:`predict`; a tie is no answer, so a tie with the label counts as fooled
    and a tie with the target does not)."""
    x, y = x.detach().cpu(), y.detach().cpu()
    x_adv = x_adv.detach().cpu().float()
    finite = torch.isfinite(x_adv.flatten(1)).all(dim=1)
    x_adv = torch.where(finite.view(-1, 1, 1, 1), x_adv, x).clamp(0.0, 1.0)
    predicted = predict(model, x_adv, votes)
    fooled = finite & (predicted != y if target is None else predicted == target.cpu())
    size = distortion((x_adv - x).double(), norm)
    return Verified(x_adv=x_adv, fooled=fooled, distortion=size)


def pushed_out(
    model: Model,
    x: torch.Tensor,
    checked: Verified,
    y: torch.Tensor,
    norm: str,
    eps_list: tuple[float, ...],
    target: torch.Tensor | None = None,
    votes: int = 1,
) -> Verified:
    """``checked`` with each candidate that failed, tried again pushed out
    along its own direction to the audited radii above its distortion,
    smallest first; the first verified one replaces it.

    A minimum-norm attack on a randomised model stops where its own vote
    first says "fooled", on the boundary of the vote, where the verification
    vote goes either way (about half the time, measured on a noisy CNN);
    further out along the same direction more passes are fooled. Each
    candidate tried is verified like any other: within its radius, in
    [0,1], misclassified by the vote."""
    x = x.detach().cpu()
    x_adv, fooled, size = checked.x_adv.clone(), checked.fooled.clone(), checked.distortion.clone()
    for eps in sorted(eps_list):
        pending = (~fooled & (size > 0) & (size < eps)).nonzero().flatten()
        if len(pending) == 0:
            continue
        scale = (eps / size[pending]).float().view(-1, 1, 1, 1)
        candidate = x[pending] + (x_adv[pending] - x[pending]) * scale
        again = verify(model, x[pending], candidate, y[pending], norm,
                       None if target is None else target[pending], votes)
        won = pending[again.fooled]
        x_adv[won], fooled[won], size[won] = again.x_adv[again.fooled], True, again.distortion[again.fooled]
    return Verified(x_adv=x_adv, fooled=fooled, distortion=size)
