"""RAP: reverse adversarial perturbation, a min–max search for a flat region.

Qin, Fan, Liu, Shen, Zhang, Wang and Wu, "Boosting the Transferability of
Adversarial Attacks with Reverse Adversarial Perturbation", NeurIPS 2022,
§3 and Algorithm 1. An example in a flat region of the surrogate's loss
landscape transfers better, so instead of the attack objective at x_adv
the attack optimises its value at the worst point of a small neighbourhood:

    the inner step finds n_rap, within ‖n‖∞ ≤ ε_n, that most undoes the
    attack (the "reverse adversarial perturbation"), by ``steps`` signed
    gradient steps of size α_n = ε_n/steps from a uniform random start in
    the ε_n-ball, keeping x_adv + n in [0,1];
    the outer step then takes the gradient at x_adv + n_rap.

Late start (RAP-LS, §3): for the first K_LS iterations the attack runs
without RAP, which early on mostly slows the attack before it has reached
an adversarial region; RAP then refines that region toward a flat one. The paper runs K = 400 outer iterations with step
α = 2/255 at ε = 16/255, K_LS = 100, ε_n = 16/255, T = 8 inner steps with
α_n = 2/255 (§4 and the authors' code); ε_n defaults to 16/255 of the
[0,1] pixel range here. The inner steps see the same input transforms and
surrogate ensemble as the outer gradient; the neighbourhood stays L∞ for
an L2 attack too.

With NI, the gradient is taken at a look-ahead point x^nes_t that is not
clipped and often lies outside [0,1]. n_rap is still the reverse
perturbation of the iterate x_t, as in the paper (and the reference code,
which adds it to the in-range x_adv): the inner steps run around x_t,
keeping x_t + n in [0,1], and the outer gradient is taken at
x^nes_t + n_rap. So ‖n_rap‖∞ ≤ ε_n always holds; anchored at x^nes_t
instead, the [0,1] clamp would pull n back by the whole overshoot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transform import Step, Transform


@dataclass(frozen=True)
class ReverseAdversarialPerturbation(Transform):
    tag = "rap"
    stage = 6
    paper = (
        "Qin et al., Boosting the Transferability of Adversarial Attacks with Reverse Adversarial "
        "Perturbation, NeurIPS 2022"
    )

    eps_n: float = 16 / 255
    """ε_n, the L∞ radius of the reverse perturbation, in [0,1] pixel units."""
    steps: int = 8
    """T, the inner maximisation's signed steps, each of size ε_n/T."""
    late_start: int = 100
    """K_LS, the outer iterations run before RAP starts."""

    def __post_init__(self):
        if not self.eps_n > 0:
            raise ValueError("RAP eps_n must be > 0")
        if self.steps < 1 or self.late_start < 0:
            raise ValueError("RAP needs steps >= 1 and late_start >= 0")

    def check(self, steps: int) -> None:
        if self.late_start >= steps:
            raise ValueError(f"RAP late_start {self.late_start} must be below the attack's {steps} steps")

    def lookahead(self, x: torch.Tensor, state: None, step: Step) -> torch.Tensor:
        """x + n_rap from step K_LS on, else x: n_rap is the inner maximisation (Algorithm 1) around
        the iterate x_t = ``step.x``, which ``x`` is unless NI looks ahead of it."""
        if step.index < self.late_start:
            return x
        anchor = step.x
        low, high = (-anchor).clamp(min=-self.eps_n), (1.0 - anchor).clamp(max=self.eps_n)
        n = ((torch.rand(x.shape, generator=step.gen, device=x.device) * 2 - 1) * self.eps_n).clamp(low, high)
        alpha_n = self.eps_n / self.steps
        for _ in range(self.steps):
            n = (n - alpha_n * step.grad_at(anchor + n).sign()).clamp(low, high)
        return x + n
