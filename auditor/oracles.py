"""Oracles: the only door from an attack to the model.

An attack never sees the model adapter. It receives exactly the oracle its
threat model allows:

* :class:`GradientOracle` - logits and input gradients (white-box);
* :class:`ScoreOracle` - probabilities only (soft-label);
* :class:`LabelOracle` - top-1 labels only (hard-label);
* :class:`SurrogateOracle` - logits and gradients of the attacker's own
  surrogate models, never the target (transfer attacks, access ``none``).

No oracle subclasses another on purpose: a ``LabelOracle`` is not a
``ScoreOracle`` with less, so no ``isinstance`` or ``super()`` trick reaches
more than the declared access (they share only the query counter). Their public methods are the whole interface;
the model function and the counters are private attributes. Python cannot
hide an object from code in the same process (``vars(oracle)`` reaches
them), so the guarantee for the attacks is a rule that a test enforces: no
module under ``auditor/attacks`` reads a private attribute of another
object or introspects one (``tests/test_oracles.py``).

Every oracle serves a fixed batch of ``n`` samples. Each query row names the
sample it belongs to (``idx``); one image through the model is one query for
that sample. With a ``budget`` the oracle refuses, before running anything, a
call that would take any sample past it, so budgets are never exceeded.

A randomised model answers each call by a vote over ``passes`` model passes
(see :mod:`auditor.verify`), and each answer costs ``passes`` queries: the
attack's view (``budget``, ``queries()``, ``remaining()``) counts answers,
the harness's (``model_queries()``) the passes they cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]
PerSampleLoss = Callable[[torch.Tensor], torch.Tensor]


def input_gradient(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``d loss / d x`` for a scalar ``loss``; zeros where the loss does not
    depend on ``x`` through autograd (a model that outputs a one-hot argmax,
    runs under ``no_grad`` or ignores its input): such a model has no
    gradient to follow, which the ``zero-gradients`` check reports."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def items_within(max_values: int, each: int) -> int:
    """How many items of ``each`` input values fit in ``max_values``; at
    least one. The rule every bounded model call and probe batch uses."""
    return max(1, max_values // max(1, each))


GRAD_VALUES = 2**23
"""Input values per pass of a model with its autograd graph, at most: 10,700
MNIST digits, 2,730 images of 3 × 32 × 32, 55 of 3 × 224 × 224 (a
ResNet-50's graph for 55 images takes a few GB)."""


def logits_and_gradient(
    forward: Forward, x: torch.Tensor, loss_fn: PerSampleLoss, max_values: int = GRAD_VALUES
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, d loss_fn(logits).sum() / dx)`` with at most ``max_values``
    input values in one pass with an autograd graph.

    A larger batch is done in three steps: its logits chunk by chunk without
    a graph; the gradient of the loss with respect to them (``loss_fn`` sees
    the whole batch's logits, as it expects); then each chunk's
    vector-Jacobian product with its part of that gradient. The result is
    the one-pass gradient, for one more forward pass.
    """
    parts = _passes(x.detach(), max_values)
    if len(parts) == 1:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = forward(x).float()
            grad = input_gradient(loss_fn(logits).sum(), x)
        return logits.detach(), grad.detach()
    with torch.no_grad():
        logits = torch.cat([forward(part).float() for part in parts]).requires_grad_(True)
    with torch.enable_grad():
        upstream = input_gradient(loss_fn(logits).sum(), logits)
    grads = []
    for part, weights in zip(parts, upstream.split(len(parts[0]))):
        part = part.detach().requires_grad_(True)
        with torch.enable_grad():
            grads.append(input_gradient((forward(part).float() * weights).sum(), part).detach())
    return logits.detach(), torch.cat(grads)


def _passes(x: torch.Tensor, max_values: int) -> tuple[torch.Tensor, ...]:
    """``x`` split into passes of at most ``max_values`` input values (at
    least one image each); an empty batch is one pass."""
    return x.split(items_within(max_values, x[0].numel()) if len(x) else 1) or (x,)


def logits_in_passes(forward: Forward, x: torch.Tensor, max_values: int = GRAD_VALUES) -> torch.Tensor:
    """``forward(x)`` without autograd, at most ``max_values`` input values a pass."""
    with torch.no_grad():
        return torch.cat([forward(part).float() for part in _passes(x, max_values)])


class BudgetExceeded(RuntimeError):
    """A query was refused because a sample would exceed its budget."""


class _QueryCounter:
    """Per-sample query accounting shared by the three oracles."""

    def __init__(
        self,
        n: int,
        budget: int | None,
        device: torch.device | str = "cpu",
        on_charge: Callable[[int], None] | None = None,
        passes: int = 1,
    ):
        if budget is not None and budget < 0:
            raise ValueError("budget must be >= 0")
        if passes < 1:
            raise ValueError("passes must be >= 1")
        self._n = int(n)
        self._passes = int(passes)
        self._budget = None if budget is None else int(budget) // self._passes
        self._device = torch.device(device)
        self._queries = torch.zeros(self._n, dtype=torch.long)
        self._on_charge = on_charge

    @property
    def n(self) -> int:
        """Number of samples this oracle serves."""
        return self._n

    @property
    def budget(self) -> int | None:
        """Answers allowed per sample (``None``: unlimited): the query
        budget, divided by the passes each answer costs."""
        return self._budget

    @property
    def passes(self) -> int:
        """Model passes, so queries, each answer costs."""
        return self._passes

    @property
    def device(self) -> torch.device:
        """Device the attack should keep its tensors on."""
        return self._device

    def queries(self) -> torch.Tensor:
        """Answers given so far, per sample (a copy)."""
        return self._queries.clone()

    def model_queries(self) -> torch.Tensor:
        """Queries spent so far, per sample: model passes, ``passes`` per answer."""
        return self._queries * self._passes

    def remaining(self) -> torch.Tensor:
        """Answers each sample may still get (``2**62`` when unlimited)."""
        if self._budget is None:
            return torch.full((self._n,), 2**62, dtype=torch.long)
        return self._budget - self._queries

    def _rows(self, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"queries must be a batch (M,C,H,W), got shape {tuple(x.shape)}")
        if idx is None:
            if x.shape[0] != self._n:
                raise ValueError("idx is required when a query batch is not one row per sample")
            return torch.arange(self._n)
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        if idx.shape != (x.shape[0],):
            raise ValueError("idx must name one sample per query row")
        if len(idx):
            low, high = idx.aminmax()
            if int(low) < 0 or int(high) >= self._n:
                raise ValueError("idx out of range")
        return idx

    def _charge(self, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self._n)
        self._queries += counts
        if self._budget is not None and len(idx) and int(self._queries.max()) > self._budget:
            first = int((self._queries > self._budget).nonzero()[0])
            wanted = int(self._queries[first])
            self._queries -= counts  # refused before the model runs: nothing is charged
            raise BudgetExceeded(
                f"sample {first} would make {wanted} calls, over its budget of {self._budget}"
            )
        if self._on_charge is not None:
            self._on_charge(len(idx) * self._passes)


class GradientOracle(_QueryCounter):
    """White-box access: logits and gradients of a per-sample loss.

    One forward (and backward) pass of one image is one query.
    """

    def __init__(
        self, module: Forward, n: int, budget: int | None = None, device="cpu", on_charge=None,
        max_values: int = GRAD_VALUES,
    ):
        """``max_values`` bounds the input values of one pass through
        ``module`` (see :func:`logits_and_gradient`); it never changes results."""
        super().__init__(n, budget, device, on_charge)
        self._module = module
        self._max_values = max_values

    def logits(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        rows = self._rows(x, idx)
        self._charge(rows)
        return logits_in_passes(self._module, x, self._max_values)

    def loss_grad(
        self, x: torch.Tensor, loss_fn: PerSampleLoss, idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, d loss_fn(logits).sum() / dx)``.

        ``loss_fn`` maps logits (M,K) to a per-sample loss (M,); the gradient of
        row m is the gradient of row m's loss only.
        """
        rows = self._rows(x, idx)
        self._charge(rows)
        return logits_and_gradient(self._module, x, loss_fn, self._max_values)


class ScoreOracle(_QueryCounter):
    """Soft-label access: class probabilities, nothing else.

    ``log_probs`` gives their logarithms, the scale score attacks work on.
    Taken from probabilities, a saturated softmax (probabilities rounded to
    exactly 0 and 1, as a large logit margin gives in float32) leaves them
    flat, as it would for an attacker behind an API. A score attack run at
    white-box access has the logits, though: ``log_probabilities`` then
    gives exact log-probabilities (``log_softmax`` of the logits), as
    AutoAttack's Square reads margins off the logits.
    """

    def __init__(
        self, probabilities: Forward, n: int, budget: int | None = None, device="cpu", on_charge=None,
        log_probabilities: Forward | None = None, passes: int = 1,
    ):
        super().__init__(n, budget, device, on_charge, passes)
        self._probabilities = probabilities
        self._log_probabilities = log_probabilities

    def probs(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        rows = self._rows(x, idx)
        self._charge(rows)
        with torch.no_grad():
            return self._probabilities(x.detach()).float()

    def log_probs(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities; a probability of 0 gives the log of the
        smallest normal float, not -inf. One query per row, as ``probs``."""
        rows = self._rows(x, idx)
        self._charge(rows)
        with torch.no_grad():
            if self._log_probabilities is not None:
                return self._log_probabilities(x.detach()).float()
            probs = self._probabilities(x.detach()).float()
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


class LabelOracle(_QueryCounter):
    """Hard-label access: the top-1 label, nothing else."""

    def __init__(
        self, labels: Forward, n: int, budget: int | None = None, device="cpu", on_charge=None,
        passes: int = 1,
    ):
        super().__init__(n, budget, device, on_charge, passes)
        self._labels = labels

    def labels(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        rows = self._rows(x, idx)
        self._charge(rows)
        with torch.no_grad():
            return self._labels(x.detach()).long()


class SurrogateOracle:
    """White-box access to the attacker's surrogate models, never to the target.

    A transfer attack crafts its examples here and submits only the final
    ones to the target, which the harness does when it verifies; so nothing
    here is charged to the per-sample target budget. With several modules
    the oracle is their ensemble, which averages their logits (Liu et al.,
    "Delving into Transferable Adversarial Examples and Black-box Attacks",
    ICLR 2017; Dong et al., "Boosting Adversarial Attacks with Momentum",
    CVPR 2018, Eq. 6 with equal weights); an ensemble of one is that model.
    ``passes`` counts images through the ensemble, for information only.
    """

    def __init__(self, modules: Sequence[Forward], device="cpu"):
        if len(modules) == 0:
            raise ValueError("a SurrogateOracle needs at least one surrogate model")
        self._modules = tuple(modules)
        self._device = torch.device(device)
        self.passes = 0

    @property
    def device(self) -> torch.device:
        """Device the attack should keep its tensors on."""
        return self._device

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"inputs must be a batch (M,C,H,W), got shape {tuple(x.shape)}")
        self.passes += x.shape[0]
        return torch.stack([module(x).float() for module in self._modules]).mean(0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's logits (the mean over its models) for the batch ``x``."""
        with torch.no_grad():
            return self._logits(x)

    def loss_grad(self, x: torch.Tensor, loss_fn: PerSampleLoss) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, d loss_fn(logits).sum() / dx)`` for the ensemble's logits.

        ``loss_fn`` maps logits (M,K) to a per-sample loss (M,), as for
        :meth:`GradientOracle.loss_grad`.
        """
        return logits_and_gradient(self._logits, x, loss_fn)
