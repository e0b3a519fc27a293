"""Square Attack, L∞ (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020).

"Square Attack: a query-efficient black-box adversarial attack via random
search", https://arxiv.org/abs/1912.00049. A score-based random search: each
step proposes a perturbation that differs from the current best one only
inside a random square window, queries the model once and keeps the proposal
if the loss went down.

Steps of Algorithm 1 (random search), with the L∞ sampling distribution of
Algorithm 2, all batched over the samples with a per-sample mask of those
still attacked:

* line 1, initialisation: the vertical stripes of the L∞ attack, every
  column set to +ε or -ε independently per channel, clipped to [0,1]; one
  query per sample.
* the loss L: the untargeted margin ``log p_y - max_{j≠y} log p_j`` (equal to
  the logit margin, since softmax preserves logit differences), or ``"ce"``,
  the negative cross-entropy ``log p_y`` that AutoAttack's version offers.
  Success is always judged on the margin: a sample whose margin drops below
  0 is misclassified and leaves the active set (line 2), spending nothing
  more.
* line 3, the side length from the reference code's schedule of ``p`` (the
  fraction of pixels changed): ``p_init`` halved at iterations 10, 50, 200,
  500, 1000, 2000, 4000, 6000 and 8000 of 10,000, with the iteration index
  rescaled by ``10000 / n_iters`` for other budgets;
  ``s = round(sqrt(p · H·W))``, clipped to ``[1, min(H, W)]``.
* line 4, δ ~ P (Algorithm 2): a random window per sample; inside it δ is
  set to ±ε, one sign per channel. The reference code redraws the signs
  while the (clipped) image would stay unchanged; since at most one sign
  vector can leave a window unchanged, that draw is made exactly in one
  step by flipping a uniform non-empty subset of its channels.
* line 5, the candidate is projected onto the ε-ball and [0,1].
* lines 6-7, one query per active sample with budget left; the candidate is
  accepted where its loss is strictly lower.

Defaults: ``p_init = 0.8`` is the value the reference repository
(``max-andr/square-attack``, README) runs on the adversarially trained MNIST
model at ε = 0.3, and AutoAttack's default for its Square Attack; the
reference code's command-line default 0.05 is its choice for the undefended
ImageNet models. Without an oracle budget the schedule assumes ``n_iters =
10000`` queries, the reference code's ``--n_iter`` default, and stops there.

Deviation from the reference code: its window corner is drawn from
``randint(0, H - s)``, so the last row and column are never in a window and
``s`` is capped at ``H - 1``; here the corner is uniform over all
``H - s + 1`` positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...oracles import ScoreOracle
from ..base import FIXED_EPS, Attack, AttackResult, generator

_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_LOSSES = ("margin", "ce")


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Piecewise-constant schedule of ``p`` (Alg. 1 line 3, reference code)."""
    scaled = int(it / n_iters * 10000)
    halvings = sum(scaled > bound for bound in _SCHEDULE)
    return p_init / 2**halvings


def _margin_and_loss(
    probs: torch.Tensor, y: torch.Tensor, loss: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row margin ``log p_y - max_{j≠y} log p_j`` and the loss to minimise."""
    logp = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    correct = logp.gather(1, y[:, None]).squeeze(1)
    others = logp.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    margin = correct - others
    return margin, (margin if loss == "margin" else correct)


@dataclass(frozen=True)
class SquareAttack(Attack):
    """Square Attack (L∞), a fixed-ε random search on scores."""

    name: ClassVar[str] = "square"
    oracle: ClassVar[type] = ScoreOracle
    kind: ClassVar[str] = FIXED_EPS
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    paper: ClassVar[str] = "Andriushchenko et al., Square Attack, ECCV 2020"

    norm: str = "linf"
    p_init: float = 0.8
    loss: str = "margin"
    n_iters: int = 10000
    """Query budget per sample assumed when the oracle has none."""

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ValueError(f"Square Attack supports norms {self.norms}, got {self.norm!r}")
        if not 0.0 < self.p_init <= 1.0:
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")
        if self.loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {self.loss!r}")
        if self.n_iters < 1:
            raise ValueError(f"n_iters must be >= 1, got {self.n_iters}")

    def __call__(
        self, oracle, x: torch.Tensor, y: torch.Tensor, *, eps: float | None = None, seed: int = 0
    ) -> AttackResult:
        if eps is None:
            raise ValueError("Square Attack is a fixed-ε attack: eps is required")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        device = oracle.device
        gen = generator(seed, device)
        x = x.to(device)
        y = y.to(device)
        n, c, h, w = x.shape
        n_iters = self.n_iters if oracle.budget is None else oracle.budget

        # The ε-box ∩ [0,1] per pixel: a coordinate set to ±ε and projected
        # (line 5) is exactly ``upper`` or ``lower``.
        lower, upper = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        x_best = x.clone()
        margin_min = torch.full((n,), float("inf"), device=device)
        loss_min = torch.full((n,), float("inf"), device=device)
        queried = torch.zeros(n, dtype=torch.bool, device=device)

        # Alg. 1 line 1: vertical-stripe initialisation, one query each.
        can = oracle.remaining().to(device) >= 1
        rows = can.nonzero().squeeze(1)
        if len(rows):
            stripes = _signs((len(rows), c, 1, w), gen, x) > 0
            x_init = torch.where(stripes, upper[rows], lower[rows])
            margin, loss = _margin_and_loss(oracle.probs(x_init, idx=rows.cpu()), y[rows], self.loss)
            x_best[rows] = x_init
            margin_min[rows] = margin
            loss_min[rows] = loss
            queried[rows] = True

        lines_h = torch.arange(h, device=device)
        lines_w = torch.arange(w, device=device)
        # With eps = 0 no window can change the image: the initial query is all.
        for it in range(n_iters - 1 if eps > 0 else 0):
            active = queried & (margin_min >= 0) & (oracle.remaining().to(device) >= 1)
            rows = active.nonzero().squeeze(1)
            if not len(rows):
                break
            m = len(rows)
            best_cur, low, high = x_best[rows], lower[rows], upper[rows]

            # Alg. 1 line 3: side of the square from the schedule of p.
            p = p_selection(self.p_init, it, n_iters)
            s = min(max(int(round((p * h * w) ** 0.5)), 1), h, w)

            # Alg. 1 lines 4-5 (Alg. 2): a random window per sample, ±ε per
            # channel inside it, projected; rows whose draw changes nothing
            # draw new signs for the same window (only those rows).
            top = torch.randint(0, h - s + 1, (m,), generator=gen, device=device)
            left = torch.randint(0, w - s + 1, (m,), generator=gen, device=device)
            in_h = (lines_h[None] >= top[:, None]) & (lines_h[None] < top[:, None] + s)
            in_w = (lines_w[None] >= left[:, None]) & (lines_w[None] < left[:, None] + s)
            window = (in_h[:, :, None] & in_w[:, None, :])[:, None]
            positive = _signs((m, c, 1, 1), gen, x) > 0
            x_new = torch.where(window, torch.where(positive, high, low), best_cur)
            same = (((x_new - best_cur).abs() < 1e-7) | ~window).flatten(1).all(dim=1)
            if same.any():
                # At most one sign vector leaves a window unchanged (the one
                # matching a window already at one bound per channel), so
                # XOR-ing it with a uniform non-zero mask is an exact draw
                # from the reference code's rejection loop, in one step.
                rows_same = same.nonzero().squeeze(1)
                code = torch.randint(1, 2**c, (len(rows_same), 1), generator=gen, device=device)
                flip = ((code >> torch.arange(c, device=device)) & 1).bool().view(-1, c, 1, 1)
                positive[rows_same] ^= flip
                x_new[rows_same] = torch.where(
                    window[rows_same],
                    torch.where(positive[rows_same], high[rows_same], low[rows_same]),
                    best_cur[rows_same],
                )

            # Alg. 1 lines 6-7: one query, keep strict improvements.
            margin, loss = _margin_and_loss(oracle.probs(x_new, idx=rows.cpu()), y[rows], self.loss)
            improved = loss < loss_min[rows]
            kept = rows[improved]
            loss_min[kept] = loss[improved]
            margin_min[kept] = margin[improved]
            x_best[kept] = x_new[improved]

        return AttackResult(
            x_adv=x_best, success=queried & (margin_min < 0), queries=oracle.queries()
        )


def _signs(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform random ±1 of ``shape``, with the dtype and device of ``like``."""
    bits = torch.randint(0, 2, shape, generator=gen, device=like.device)
    return bits.to(like.dtype) * 2 - 1
