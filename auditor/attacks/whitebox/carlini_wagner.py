"""Carlini-Wagner L2, untargeted, batched with per-sample constants.

Carlini and Wagner, "Towards Evaluating the Robustness of Neural Networks",
IEEE S&P 2017 [CW17], https://arxiv.org/abs/1608.04644. Every step below runs
for all samples at once; each sample has its own w, Adam moments, constant c,
binary-search bounds, active mask and best example.

* change of variables (§V.A, "change of variables"): the attack optimises
  w with x' = (tanh(w) + 1)/2, so x' is in [0,1] without clipping; w starts
  at the clean image, w₀ = artanh((2x − 1)·(1 − 10⁻⁶)) (the factor keeps
  artanh finite on pixels at 0 or 1, as in the official code).
* objective (§V, Eq. "minimize ‖½(tanh(w)+1) − x‖₂² + c·f(½(tanh(w)+1))"):
  ‖x' − x‖₂² + c·f(x'), with the untargeted form of objective f₆ (§IV.A,
  f₆ with "confidence" κ, §V.B):
  f(x') = max(Z(x')_y − max_{i≠y} Z(x')_i, −κ) on the logits Z.
  The oracle differentiates c·f(x'); the gradient of the distance term and
  the chain rule through x' = (tanh(w) + 1)/2, ∂x'/∂w = (1 − tanh²w)/2, are
  exact and cost no query.
* optimiser (§V.A): Adam (Kingma and Ba, ICLR 2015, Algorithm 1, with
  β₁ = 0.9, β₂ = 0.999, ε = 10⁻⁸) on w, written on the batch tensor: the
  moments and the step count are per sample and only active samples move.
* constant c (§V.A, "binary search"): per sample, c starts at
  ``initial_const``; after each of ``binary_search_steps`` rounds of
  ``steps`` Adam steps (each round restarts from w₀ with fresh moments), a
  sample that found an adversarial example lowers its upper bound to c and
  one that did not raises its lower bound to c; c is then the midpoint of the
  bounds, or ×10 while no upper bound is known (the official code's rule).
* success and the result: an iterate is adversarial when
  max_{i≠y} Z_i ≥ Z_y + κ and argmax Z ≠ y, read from the logits that the
  gradient query returns for that iterate (no extra query). Each sample keeps
  the adversarial iterate of smallest L2 distortion over all rounds and
  steps; ``x_adv`` is that example (or ``x`` if none), ``success`` says
  whether one was found.
* early abort (the official ``ABORT_EARLY``), per sample: every
  ⌈``steps``/10⌉ steps, a sample whose objective did not fall below
  0.9999 × its value at the previous check stops for the rest of the round.

Defaults. The official code (``carlini/nn_robust_attacks``, ``l2_attack.py``)
uses ``BINARY_SEARCH_STEPS = 9``, ``MAX_ITERATIONS = 10000``,
``LEARNING_RATE = 1e-2``, ``INITIAL_CONST = 1e-3``, ``CONFIDENCE = 0``,
``ABORT_EARLY = True`` (Foolbox 3 keeps these); [CW17] reports its MNIST
numbers with 9 binary-search steps too. Up to 90,000 gradient queries a
sample is too slow for an audit, so here ``binary_search_steps = 5`` and
``steps = 100`` (at most 500 queries a sample), with
``initial_const = 1e-2``, one factor of 10 above the official start because
five rounds leave fewer to climb from a constant too small to succeed, and
``kappa = 0`` as in the official code. The learning rate is the official
0.01 where a pixel starts mid-range and grows, up to ``max_learning_rate``
= 0.1, where it starts near 0 or 1: Adam moves each coordinate of w by about
its rate per step, and a pixel moves ∂x'/∂w = 2x'(1 − x') times that, which
is 0.5 at mid-grey and about 2·10⁻⁶ at a pixel of 0 or 1 (|w₀| ≈ 7.25, and
0.01 × 100 steps = 1 barely moves it). So each coordinate's rate is
``learning_rate × 0.5 / (2x(1 − x))`` within [``learning_rate``,
``max_learning_rate``], x the clean pixel: every pixel can start moving about
as fast as a mid-grey one. Measured against one rate for all (5 × 100
steps): on 94 example MNIST digits (90 % of pixels saturated) 0.01 found an
example for about half of them and 0.1 for all, at median L2 1.10; the
per-pixel rate finds all, at 1.09, the official 9 × 1000-step schedule's
median. On 29 colour digits (3 × 32 × 32, a small ResNet, 94 % of pixels
mid-range) 0.1 overshoots: median L2 0.99, against 0.650 with 0.01 and 0.654
with the per-pixel rate.

``eps`` is ignored (a minimum-norm attack). With an oracle budget, a sample
is queried only while it has budget left. ``trace`` holds, after each
binary-search round, each sample's query count so far and its best L2
distortion (inf where none yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...oracles import GradientOracle
from ..base import MIN_NORM, Attack, AttackResult, check_call, distortion, logit_margin

_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8
_TANH_SHRINK = 1 - 1e-6
_NO_UPPER = 1e10


@dataclass(frozen=True)
class CarliniWagnerL2(Attack):
    name = "cw"
    oracle = GradientOracle
    kind = MIN_NORM
    norms = ("l2",)
    paper = (
        "Carlini and Wagner, Towards Evaluating the Robustness of Neural Networks, IEEE S&P 2017"
    )
    in_default_battery = False

    norm: str = "l2"
    binary_search_steps: int = 5
    steps: int = 100
    initial_const: float = 1e-2
    learning_rate: float = 0.01
    """Adam's rate for coordinates whose pixel starts mid-range (see above)."""
    max_learning_rate: float = 0.1
    """The rate for coordinates whose pixel starts at 0 or 1."""
    kappa: float = 0.0
    abort_early: bool = True

    def __post_init__(self):
        if self.norm != "l2":
            raise ValueError("Carlini-Wagner L2 only runs in the l2 norm")
        if self.binary_search_steps < 1 or self.steps < 1:
            raise ValueError("C&W needs binary_search_steps >= 1 and steps >= 1")
        if not self.initial_const > 0 or not self.learning_rate > 0:
            raise ValueError("C&W needs initial_const > 0 and learning_rate > 0")
        if not self.max_learning_rate >= self.learning_rate:
            raise ValueError("C&W needs max_learning_rate >= learning_rate")
        if not self.kappa >= 0:
            raise ValueError("C&W needs kappa >= 0")

    def __call__(self, oracle: GradientOracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        n, device = len(x), x.device
        shape = (-1, *([1] * (x.dim() - 1)))
        w0 = torch.atanh((2 * x - 1) * _TANH_SHRINK)
        # per coordinate: as fast in pixels as a mid-grey one at learning_rate
        slope = (2 * x * (1 - x)).clamp_min(1e-12)
        rate = (0.5 * self.learning_rate / slope).clamp(self.learning_rate, self.max_learning_rate)
        const = torch.full((n,), self.initial_const, dtype=x.dtype, device=device)
        lower = torch.zeros(n, dtype=x.dtype, device=device)
        upper = torch.full((n,), _NO_UPPER, dtype=x.dtype, device=device)
        best_x = x.clone()
        best_l2 = torch.full((n,), math.inf, dtype=x.dtype, device=device)
        check_every = math.ceil(self.steps / 10)
        trace = []
        for _ in range(self.binary_search_steps):
            w = w0.clone()
            m, v = torch.zeros_like(w), torch.zeros_like(w)
            t = torch.zeros(n, device=device)
            found = torch.zeros(n, dtype=torch.bool, device=device)
            active = torch.ones(n, dtype=torch.bool, device=device)
            previous = torch.full((n,), math.inf, dtype=x.dtype, device=device)
            for step in range(self.steps):
                active &= oracle.remaining().to(device) > 0
                rows = active.nonzero().flatten()
                if len(rows) == 0:
                    break
                y0, c0, tanh_w = y[rows], const[rows], torch.tanh(w[rows])
                x_new = (tanh_w + 1) / 2
                delta = x_new - x[rows]

                def loss_fn(logits, y0=y0, c0=c0):
                    return c0 * logit_margin(logits, y0).clamp_min(-self.kappa)

                logits, grad_f = oracle.loss_grad(x_new, loss_fn, idx=rows.cpu())
                margin = logit_margin(logits, y0)
                l2 = distortion(delta, "l2")
                adversarial = (margin <= -self.kappa) & (logits.argmax(1) != y0)
                better = adversarial & (l2 < best_l2[rows])
                best_l2[rows[better]] = l2[better]
                best_x[rows[better]] = x_new[better]
                found[rows[adversarial]] = True

                if self.abort_early and step % check_every == 0:
                    objective = l2**2 + c0 * margin.clamp_min(-self.kappa)
                    keep = objective <= 0.9999 * previous[rows]
                    previous[rows] = objective
                    active[rows[~keep]] = False
                    rows, tanh_w = rows[keep], tanh_w[keep]
                    delta, grad_f = delta[keep], grad_f[keep]
                if step + 1 == self.steps:
                    break

                grad_w = (2 * delta + grad_f) * (1 - tanh_w**2) / 2
                t[rows] += 1
                m[rows] = _BETA1 * m[rows] + (1 - _BETA1) * grad_w
                v[rows] = _BETA2 * v[rows] + (1 - _BETA2) * grad_w**2
                m_hat = m[rows] / (1 - _BETA1 ** t[rows]).view(shape)
                v_hat = v[rows] / (1 - _BETA2 ** t[rows]).view(shape)
                w[rows] -= rate[rows] * m_hat / (v_hat.sqrt() + _ADAM_EPS)

            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(upper < _NO_UPPER, (lower + upper) / 2, const * 10)
            trace.append((oracle.queries(), best_l2.clone()))

        return AttackResult(
            x_adv=best_x, success=torch.isfinite(best_l2), queries=oracle.queries(), trace=trace
        )
