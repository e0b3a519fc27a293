"""Free adversarial training: every backward pass updates both θ and δ.

Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor, Goldstein,
"Adversarial training for free!", NeurIPS 2019, Algorithm 1:

* δ ← 0 once, and δ is carried from one minibatch to the next (line 2);
* each minibatch is replayed m times (line 4, "for i = 1 … m");
* one backward pass gives g_θ and g_δ = ∇_δ ℓ(x + δ, y) (lines 5–6);
* θ ← θ − η·g_θ (line 7, one Adam step here);
* δ ← clip(δ + ε·sign(g_δ), −ε, ε) (line 8; step ε, i.e. α = 1·ε).

To keep the number of backward passes of ``epochs`` ordinary epochs, the
data is passed over ⌈epochs/m⌉ times, as Shafahi et al. train for N_ep/m epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import HardenConfig
from .train import BatchOutcome, Method, Trainer, clip_delta, largest_batch, steepest_ascent

DEFAULT_ALPHA = 1.0
"""α / ε (Shafahi et al., Algorithm 1 line 8)."""


@dataclass(frozen=True)
class FreeAT(Method):
    name = "free"
    label = "free adversarial training"
    paper = "Shafahi et al., Adversarial training for free!, NeurIPS 2019"

    norm: str
    replays: int = 8
    alpha: float = DEFAULT_ALPHA
    eps_scale: float = 1.0

    @classmethod
    def from_config(cls, config: HardenConfig) -> FreeAT:
        alpha = DEFAULT_ALPHA if config.alpha is None else config.alpha
        scale = 1.0 if config.eps_scale is None else config.eps_scale
        return cls(norm=config.norm, replays=config.setting("replays"), alpha=alpha, eps_scale=scale)

    @property
    def updates_per_batch(self) -> int:
        return self.replays

    def data_passes(self, epochs: int) -> int:
        return math.ceil(epochs / self.replays)

    def train_batch(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> BatchOutcome:
        box = trainer.config.clip_to_box
        carried = trainer.state.get("delta")
        if carried is None:
            carried = x.new_zeros((largest_batch(trainer.config.batch_size), *x.shape[1:]))  # line 2
        delta = carried[: len(x)].clone()
        for _ in range(self.replays):  # line 4
            eps = trainer.eps * self.eps_scale
            delta = clip_delta(delta, x, eps, self.norm, box).requires_grad_(True)
            loss, logits = trainer.loss(x + delta, y)
            trainer.update(loss)  # lines 5-7: one backward pass for θ and δ
            grad = torch.nan_to_num(delta.grad)
            delta = delta.detach() + self.alpha * eps * steepest_ascent(grad, self.norm)
        carried[: len(x)] = clip_delta(delta, x, trainer.eps * self.eps_scale, self.norm, box)  # line 8
        trainer.state["delta"] = carried
        return BatchOutcome(loss.item(), int((logits.argmax(1) == y).sum()), len(y))
