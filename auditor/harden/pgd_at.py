"""PGD adversarial training, the baseline of fast training.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models
Resistant to Adversarial Attacks", ICLR 2018: the saddle-point problem
min_θ E[max_{δ∈S} ℓ(θ, x + δ, y)] (their Eq. 2.1), whose inner maximisation
is solved per minibatch by k steps of projected gradient ascent:

* random start: δ⁰ uniform in the ε-ball (§3);
* δ^{t+1} = Π_S(δ^t + α·sign(∇_δ ℓ(θ, x + δ^t, y))) for t < k (their PGD
  iteration; for L2 the normalised gradient instead of the sign);
* then one optimiser step on ℓ(θ, x + δ^k, y) (the outer minimisation,
  justified by Danskin's theorem).

Their MNIST setting is k = 40 steps of α = 0.01 at ε = 0.3, i.e. α = ε/30:
its adversary can walk k·α = 4ε/3 in all, more than the radius.
The default step keeps that walk for any k, α = 4ε/(3k) (ε/30 at k = 40):
with α fixed at ε/30, PGD-7 walks only 7ε/30 from its random start, and its
examples hurt the model little more than the uniform noise of the start
does, so training against them is training against noise. An explicit
``alpha`` is kept as given. The cost is k + 1 forward/backward passes per
minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import HardenConfig
from .train import BatchOutcome, Method, Trainer, clip_delta, random_delta, steepest_ascent


def default_alpha(steps: int) -> float:
    """α / ε for a ``steps``-step adversary: 4/(3k), so that its walk k·α is that of
    Madry et al.'s MNIST adversary, 40 steps of ε/30 (0.01 at ε = 0.3)."""
    return 4 / (3 * steps)


@dataclass(frozen=True)
class PGDAT(Method):
    name = "pgd"
    label = "PGD adversarial training"
    paper = "Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018"

    norm: str
    steps: int
    alpha: float
    """α / ε: :func:`default_alpha` of ``steps`` unless given."""
    eps_scale: float = 1.0

    @classmethod
    def from_config(cls, config: HardenConfig) -> PGDAT:
        steps = config.setting("steps")
        alpha = default_alpha(steps) if config.alpha is None else config.alpha
        scale = 1.0 if config.eps_scale is None else config.eps_scale
        return cls(norm=config.norm, steps=steps, alpha=alpha, eps_scale=scale)

    def train_batch(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> BatchOutcome:
        eps, box = trainer.eps * self.eps_scale, trainer.config.clip_to_box
        delta = random_delta(trainer, x, eps)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss, _ = trainer.loss(x + delta, y)
            grad = trainer.input_grad(loss, delta)
            delta = clip_delta(delta.detach() + self.alpha * eps * steepest_ascent(grad, self.norm),
                               x, eps, self.norm, box)
        loss, logits = trainer.loss(x + delta, y)
        trainer.update(loss)
        return BatchOutcome(loss.item(), int((logits.argmax(1) == y).sum()), len(y))
