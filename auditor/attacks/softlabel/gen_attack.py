"""GenAttack, L∞: a genetic search on scores, targeted and untargeted.

Alzantot, Sharma, Chakraborty, Zhang, Hsieh and Srivastava, "GenAttack:
Practical Black-box Attacks with Gradient-Free Optimization", GECCO 2019
[ASC19], https://arxiv.org/abs/1805.11090. A population of N images in the
ε-ball evolves by fitness-proportional selection, crossover and mutation;
only output probabilities are used.

The steps of [ASC19] Algorithm 1, in its order, batched over the samples
(a tensor of shape (samples, N, C, H, W) holds every population; there is no
loop over images or population members). The paper's text was not at hand
when this was written, so steps are named rather than numbered; they were
checked against the reference code (``nesl/adversarial_genattack``,
``genattack_tf2.py``):

* initial population: ``x + U(-ε, ε)`` per coordinate, projected
  onto the ε-ball ∩ [0,1].
* ComputeFitness of every new member, from log-probabilities only (the
  elite carried over from the last generation keeps the fitness it was
  scored with, see "Queries" below):
  targeted (target t), the paper's ``log p_t - log Σ_{j≠t} p_j``;
  untargeted, its mirror ``log Σ_{j≠y} p_j - log p_y`` (the log-odds of
  "not y"; chosen over the max-margin because it moves with every wrong
  class, which keeps the fitness landscape smoother for the selection
  softmax). ``Σ_{j≠·} p_j`` is summed over the other classes, never taken
  as ``1 - p``, so it keeps its precision when ``p`` is close to 1.
* success test on the population: a sample succeeds as soon as any member of its
  population is adversarial (targeted: argmax = t; untargeted: argmax ≠ y).
  Its ``x_adv`` is the fittest adversarial member and it leaves the active
  set at once, spending nothing more. (Algorithm 1 tests only the elite; a
  non-elite adversarial member is just as good and was already paid for.)
  A carried elite is part of the test without a query: it is known not to
  be adversarial, or its sample would have stopped in the generation that
  scored it; it stays a candidate for the fittest member.
* elitism: the fittest member is copied to the next generation.
* selection probabilities ``softmax(F / τ)``.
* the N - 1 children: two parents each, drawn with
  replacement by those probabilities (one ``torch.multinomial`` call for
  all samples); uniform crossover taking each coordinate from parent 1
  with probability ``p1 / (p1 + p2)``; mutation adding ``U(-αε, αε)`` to
  each coordinate with probability ρ; then projection onto the
  ε-ball ∩ [0,1].
* adaptive parameter scaling (the paper's "adaptive parameter scaling"):
  ``ρ = max(ρ_min, 0.5 · 0.9^k)``, ``α = max(α_min, 0.4 · 0.9^k)``, with k
  the sample's number of plateaus: k grows by one each time its best
  fitness has not improved (strictly) for ``plateau_length`` generations in
  a row. :func:`mutation_schedule` and :func:`plateau_update` are this rule;
  each sample carries its own ρ, α and counters, so the first generations
  explore with ρ = 0.5, α = 0.4 and a sample that stalls narrows towards
  the floors. With ``adaptive=False``, ρ = ``rho_min`` and α = ``alpha_min``
  throughout (the paper's non-adaptive variant).

Defaults: N = 6 and τ = 0.1 as in the paper's experiments and the
reference code (``nesl/adversarial_genattack``, ``main.py``); ρ_min = 0.05
and α_min = 0.15 (the reference code's command-line floors are 0.005 and
0.20, Foolbox 3's 0.10 and 0.15). ``plateau_length = 100`` is the reference
code's threshold once the target is close (it uses 300 while the target's
probability margin is below -0.4; here one threshold serves throughout).
Not taken from the reference code: it forces ρ = 1 for the first 10
generations and detects plateaus on the probability margin rather than on
the fitness; this module follows the paper.

Queries, per sample: every member is scored once, when it is new. The
elite copied into the next generation was scored in the last one: its
fitness (and that it is not adversarial) is carried over, not asked again.
Algorithm 1 recomputes the fitness of all N members each generation; the
reference code reuses the elite's and counts ``num_steps · (N - 1) + 1``
queries, as here. So a sample spends N for the initial population
(generation 0) and N - 1 for each generation after it: ``N + g · (N - 1)``
once generation g is scored, exactly what a sample that succeeds in
generation g has spent, and at most ``N + max_generations · (N - 1)``. With
a budget B a sample takes the initial population only if it can pay N, and
each later generation only if it can pay its N - 1 new members, so it
spends at most ``N + (N - 1) · ⌊(B - N) / (N - 1)⌋ ≤ B`` (for B ≥ N); a
sample that cannot pay stops alone while the others go on. With ε = 0
nothing can evolve and only the initial population is evaluated.

Each evaluation is one oracle call for all active samples (``n_active · N``
rows for the initial populations, ``n_active · (N - 1)`` for the new members
of a later generation, the ``idx`` of each sample repeated as many times),
and each generation is bred for all of them at once, unless their
populations hold more than ``max_values`` input values (3,566 MNIST
populations; 18 of 3 × 224 × 224): then evaluation and breeding go group by
group of samples, which bounds the memory of the crossover and mutation
tensors.

Departure from Foolbox 3's ``GenAttack``: that one runs only targeted; here
``target=None`` gives the untargeted fitness above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...access import Access
from ...oracles import ScoreOracle, items_within
from ..base import FIXED_EPS, Attack, AttackResult, check_call, generator

_RHO_SCALE = 0.5
_ALPHA_SCALE = 0.4
_DECAY = 0.9


def mutation_schedule(
    plateaus: torch.Tensor | None, rho_min: float, alpha_min: float, m: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """[ASC19] adaptive scaling, per sample with k plateaus:
    ``ρ = max(ρ_min, 0.5·0.9^k)``, ``α = max(α_min, 0.4·0.9^k)``.

    ``plateaus=None`` is the non-adaptive variant: ``ρ_min`` and ``α_min``
    for each of ``m`` samples.
    """
    if plateaus is None:
        return torch.full((m,), float(rho_min)), torch.full((m,), float(alpha_min))
    decay = _DECAY ** plateaus.to(torch.float64)
    rho = torch.clamp(_RHO_SCALE * decay, min=rho_min)
    alpha = torch.clamp(_ALPHA_SCALE * decay, min=alpha_min)
    return rho, alpha


def plateau_update(
    best: torch.Tensor,
    stall: torch.Tensor,
    plateaus: torch.Tensor,
    fitness_now: torch.Tensor,
    plateau_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One generation of the plateau counters (per sample).

    ``best`` is the best fitness so far and ``stall`` the generations since
    it last improved; an improvement (strictly greater) resets ``stall``,
    and ``plateau_length`` stalled generations in a row add one plateau
    (the k of :func:`mutation_schedule`) and restart the count. Returns the
    new ``(best, stall, plateaus)``.
    """
    improved = fitness_now > best
    best = torch.where(improved, fitness_now, best)
    stall = torch.where(improved, torch.zeros_like(stall), stall + 1)
    plateau = stall >= plateau_length
    return best, torch.where(plateau, torch.zeros_like(stall), stall), plateaus + plateau.long()


def fitness(
    logp: torch.Tensor, label: torch.Tensor, targeted: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fitness and adversarial flag from log-probabilities (M, K)
    (``ScoreOracle.log_probs``): ``log p_label − log Σ_{j≠label} p_j``.

    ``label`` is the target t (targeted) or the true class y (untargeted).
    """
    own = logp.gather(1, label[:, None]).squeeze(1)
    others = logp.scatter(1, label[:, None], float("-inf")).logsumexp(dim=1)
    log_ratio = own - others
    top = logp.argmax(dim=1)
    if targeted:
        return log_ratio, top == label
    return -log_ratio, top != label


@dataclass(frozen=True)
class GenAttack(Attack):
    """GenAttack (L∞), a fixed-ε genetic search on scores."""

    name: ClassVar[str] = "genattack"
    oracle: ClassVar[type] = ScoreOracle
    kind: ClassVar[str] = FIXED_EPS
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    targeted: ClassVar[bool] = True
    default_up_to: ClassVar[Access] = Access.SOFT_LABEL
    paper: ClassVar[str] = (
        "Alzantot et al., GenAttack: Practical Black-box Attacks with "
        "Gradient-Free Optimization, GECCO 2019"
    )

    norm: str = "linf"
    population: int = 6
    """N, members per sample (N queries for the initial population, N - 1
    for each generation after it: the elite is not asked again)."""
    rho_min: float = 0.05
    """ρ_min, floor of the mutation probability (ρ itself when not adaptive)."""
    alpha_min: float = 0.15
    """α_min, floor of the mutation range in units of ε (α when not adaptive)."""
    temperature: float = 0.1
    """τ, temperature of the selection softmax."""
    adaptive: bool = True
    """Scale ρ and α with the number of plateaus (the paper's adaptive scaling)."""
    plateau_length: int = 100
    """Generations without improvement of the best fitness that make a plateau."""
    max_generations: int = 10000
    """Generations after the initial population, at most (whatever the budget)."""
    max_values: int = 2**24
    """Input values of the populations evaluated and bred together, at most
    (at least one sample's): it bounds memory on large images."""

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ValueError(f"GenAttack supports norms {self.norms}, got {self.norm!r}")
        if self.population < 2:
            raise ValueError(f"population must be >= 2, got {self.population}")
        if not 0.0 <= self.rho_min <= 1.0:
            raise ValueError(f"rho_min must be in [0, 1], got {self.rho_min}")
        if not 0.0 <= self.alpha_min <= 1.0:
            raise ValueError(f"alpha_min must be in [0, 1], got {self.alpha_min}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.plateau_length < 1:
            raise ValueError(f"plateau_length must be >= 1, got {self.plateau_length}")
        if self.max_generations < 0:
            raise ValueError(f"max_generations must be >= 0, got {self.max_generations}")
        if self.max_values < 1:
            raise ValueError(f"max_values must be >= 1, got {self.max_values}")

    def step_cost(self, shape: tuple[int, ...]) -> int:
        """The initial population: N queries (each later generation N - 1)."""
        return self.population

    def __call__(self, oracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        device = oracle.device
        gen = generator(seed, device)
        x = x.to(device)
        targeted = target is not None
        label = (target if targeted else y).to(device).long()
        n = len(x)
        size = self.population
        shape = x.shape[1:]

        x_adv = x.clone()
        success = torch.zeros(n, dtype=torch.bool, device=device)
        lower, upper = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        generations = self.max_generations if eps > 0 else 0

        # Alg. 1, initial population: the populations of every sample that can
        # pay its N members.
        rows = (oracle.remaining().to(device) >= size).nonzero().squeeze(1)
        if not len(rows):
            return AttackResult(x_adv=x_adv, success=success, queries=oracle.queries())
        work = _Working.start(rows, label, lower, upper)
        noise = (torch.rand((len(rows), size, *shape), generator=gen, device=device) * 2 - 1) * eps
        pop = torch.minimum(torch.maximum(x[rows, None] + noise, work.lower), work.upper)

        per_group = items_within(self.max_values, size * x[0].numel())
        # The fitness of the members already scored, slot 0 onwards: none in
        # the initial population, the elite in each generation after it.
        carried = torch.empty((len(rows), 0), device=device)
        for step in range(generations + 1):
            m, new = len(work.rows), size - carried.shape[1]
            # Alg. 1, ComputeFitness of the new members: one oracle call for
            # all populations (a group's).
            scored = [
                fitness(
                    oracle.log_probs(
                        pop[part, -new:].flatten(0, 1), idx=work.rows_cpu[part].repeat_interleave(new)
                    ).to(device),
                    work.label[part].repeat_interleave(new), targeted,
                )
                for part in _groups(m, per_group)
            ]
            fresh_fit = torch.cat([fit for fit, _ in scored]).view(m, new)
            fresh_adv = torch.cat([adv for _, adv in scored]).view(m, new)
            fit = torch.cat([carried, fresh_fit], dim=1)
            adv = torch.cat([torch.zeros_like(carried, dtype=torch.bool), fresh_adv], dim=1)

            # Success test: a sample with an adversarial member is done (a
            # carried elite is not adversarial: its sample would have stopped).
            elite = fit.argmax(dim=1)
            done = adv.any(dim=1)
            best_adv = fit.masked_fill(~adv, float("-inf")).argmax(dim=1)
            chosen = torch.where(done, best_adv, elite)
            x_adv[work.rows] = pop[torch.arange(m, device=device), chosen]
            success[work.rows[done]] = True

            # Adaptive scaling: plateau counters, per sample.
            best = fit.max(dim=1).values
            work.update_plateaus(best, self.plateau_length)

            if step == generations:
                break
            # The next generation asks for its N - 1 children only.
            keep = ~done & (oracle.remaining().to(device)[work.rows] >= size - 1)
            if not bool(keep.all()):
                if not bool(keep.any()):
                    break
                work = work.select(keep)
                pop, fit, elite = pop[keep], fit[keep], elite[keep]
                m = len(work.rows)
            rho, alpha = mutation_schedule(
                work.plateaus if self.adaptive else None, self.rho_min, self.alpha_min, m
            )
            carried = fit[torch.arange(m, device=device), elite][:, None]
            pop = torch.cat([
                self._breed(pop[part], fit[part], elite[part], rho[part], alpha[part],
                            work.lower[part], work.upper[part], eps, gen)
                for part in _groups(m, per_group)
            ])

        return AttackResult(x_adv=x_adv, success=success, queries=oracle.queries())

    def _breed(self, pop, fit, elite, rho, alpha, lower, upper, eps: float, gen) -> torch.Tensor:
        """The next generation of the populations ``pop`` (m, N, C, H, W)
        from their fitness: the elite, then N - 1 children by selection,
        crossover and mutation, clipped to the box ``[lower, upper]``."""
        m, size, shape, device = len(pop), self.population, pop.shape[2:], pop.device
        # Elitism.
        elite_x = pop[torch.arange(m, device=device), elite]
        # Selection probabilities (float64: τ = 0.1 sharpens a lot).
        select = torch.softmax(fit.double() / self.temperature, dim=1)
        # Parents: 2(N-1) per sample, with replacement.
        parents = torch.multinomial(select, 2 * (size - 1), replacement=True, generator=gen)
        first, second = parents[:, : size - 1], parents[:, size - 1 :]
        p1, p2 = select.gather(1, first), select.gather(1, second)
        share = (p1 / (p1 + p2).clamp_min(1e-300)).to(pop.dtype)
        # Uniform crossover, parent 1 with probability p1/(p1+p2), and mutation,
        # U(-αε, αε) with probability ρ, from one uniform u per coordinate
        # (drawing is most of a generation's own cost): u < share picks parent 1,
        # and u rescaled within the side it fell on, v, is again uniform and
        # independent of that choice; v < ρ mutates, by (2v/ρ - 1)·αε, and v/ρ
        # is uniform given v < ρ.
        share = share.view(m, size - 1, *[1] * len(shape))
        u = torch.rand((m, size - 1, *shape), generator=gen, device=device)
        take_first = u < share
        children = torch.where(take_first, _gather(pop, first), _gather(pop, second))
        v = torch.where(take_first, u / share.clamp_min(1e-30), (u - share) / (1 - share).clamp_min(1e-30))
        bcast = (m, 1, *[1] * len(shape))
        rho = rho.to(device=device, dtype=pop.dtype).view(bcast)
        step = (alpha.to(device=device, dtype=pop.dtype) * eps).view(bcast)
        children = torch.where(v < rho, children + (2 * v / rho - 1) * step, children)
        # Clip back to the ε-ball ∩ [0,1].
        children = torch.minimum(torch.maximum(children, lower), upper)
        return torch.cat([elite_x[:, None], children], dim=1)


def _groups(m: int, per_group: int) -> list[slice]:
    """Consecutive groups of at most ``per_group`` of ``m`` samples."""
    return [slice(first, first + per_group) for first in range(0, m, per_group)]


def _gather(pop: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """``pop[i, which[i, j]]`` for every (i, j): members picked per sample."""
    m = pop.shape[0]
    return pop[torch.arange(m, device=pop.device)[:, None], which]


@dataclass
class _Working:
    """Compact per-sample state of the samples a GenAttack run still attacks."""

    rows: torch.Tensor
    rows_cpu: torch.Tensor
    label: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    """ε-box ∩ [0,1] per sample, shaped (m, 1, C, H, W) to broadcast."""
    best: torch.Tensor
    """Best fitness seen so far."""
    stall: torch.Tensor
    """Generations since ``best`` last improved."""
    plateaus: torch.Tensor
    """k, the number of plateaus so far."""

    @classmethod
    def start(cls, rows, label, lower, upper) -> _Working:
        m = len(rows)
        device = rows.device
        return cls(
            rows=rows, rows_cpu=rows.cpu(), label=label[rows],
            lower=lower[rows, None], upper=upper[rows, None],
            best=torch.full((m,), float("-inf"), device=device),
            stall=torch.zeros(m, dtype=torch.long, device=device),
            plateaus=torch.zeros(m, dtype=torch.long, device=device),
        )

    def select(self, keep: torch.Tensor) -> _Working:
        rows = self.rows[keep]
        return _Working(
            rows=rows, rows_cpu=rows.cpu(), label=self.label[keep], lower=self.lower[keep],
            upper=self.upper[keep], best=self.best[keep], stall=self.stall[keep],
            plateaus=self.plateaus[keep],
        )

    def update_plateaus(self, best: torch.Tensor, plateau_length: int) -> None:
        self.best, self.stall, self.plateaus = plateau_update(
            self.best, self.stall, self.plateaus, best, plateau_length
        )

