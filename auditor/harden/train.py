"""The adversarial training loop shared by every method.

A method (:mod:`.fast_at`, :mod:`.pgd_at`, :mod:`.free_at`) only says how one
minibatch is trained on: how its adversarial examples are made and how many
weight updates it takes. This module owns the rest: the data order, the
schedules, mixed precision, the guard checks and the per-epoch curve.

* Learning rate: the triangular cyclic schedule of Smith, "Cyclical Learning
  Rates for Training Neural Networks" (WACV 2017), as used by Wong, Rice and
  Kolter, "Fast is better than free", ICLR 2020 (their DAWNBench
  improvements, "cyclic learning rate"): linear from 0 to ``lr_max`` at a
  fraction ``lr_peak`` of the updates, then linear back to 0 (their MNIST
  setting: Adam, 5e-3, 2/5).
* ε warm-up: ε grows linearly from 0 over the first ``eps_warmup`` of the
  updates, as in the ε ramp of Gowal et al., "On the Effectiveness of
  Interval Bound Propagation for Training Verifiably Robust Models" (2018).
  Fine-tuning the example model at full ε from the first update (with
  α = 2·ε) dropped its clean accuracy to about 10 % in our runs.
* Mixed precision (Wong et al.'s "mixed-precision arithmetic"): on CUDA,
  forward passes run under ``torch.autocast`` (float16) and the loss is
  scaled by a ``GradScaler``; on other devices both are off.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..attacks.base import distortion, project, uniform_in_ball
from ..models.pytorch import deterministic_kernels
from .config import HardenConfig
from .guard import Check, Guard

log = logging.getLogger(__name__)


def cyclic_lr(progress: float, lr_max: float, peak: float) -> float:
    """The triangular cyclic learning rate at ``progress`` ∈ [0, 1] of training (Smith 2017)."""
    if progress < peak:
        return lr_max * progress / peak
    return lr_max * max(0.0, 1.0 - progress) / (1.0 - peak)


def ramped_eps(progress: float, eps: float, warmup: float) -> float:
    """ε after the linear warm-up over the first ``warmup`` of training (Gowal et al. 2018)."""
    if warmup == 0:
        return eps
    return eps * min(1.0, progress / warmup)


def steepest_ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit step of steepest ascent in ``norm``: sign(g) for L∞, g/‖g‖₂ for L2."""
    if norm == "linf":
        return grad.sign()
    size = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return grad / size


def clip_delta(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str, box: bool) -> torch.Tensor:
    """δ projected onto the ε-ball; with ``box`` also so that x + δ lies in [0,1]."""
    if box:
        return project(x + delta, x, eps, norm) - x
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / distortion(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def random_delta(trainer: Trainer, x: torch.Tensor, eps: float) -> torch.Tensor:
    """δ uniform in the ε-ball ([MMS18] §3 random start; Wong et al., Algorithm 3 line 4)."""
    start = uniform_in_ball(x.shape, eps, trainer.norm, trainer.noise, x.device)
    return clip_delta(start, x, eps, trainer.norm, trainer.config.clip_to_box)


@dataclass(frozen=True)
class BatchOutcome:
    """The training loss and accuracy on one minibatch's adversarial examples."""

    loss: float
    correct: int
    count: int


class Method(abc.ABC):
    """How one minibatch is trained on. Subclasses are frozen dataclasses."""

    name: str
    label: str
    paper: str

    @abc.abstractmethod
    def train_batch(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> BatchOutcome:
        """Make the batch's adversarial examples and take the method's weight update(s)."""

    @property
    def updates_per_batch(self) -> int:
        return 1

    def data_passes(self, epochs: int) -> int:
        """Passes over the training data for a run of ``epochs`` epochs."""
        return epochs

    @property
    def params(self) -> dict:
        """The method's own settings, for the record."""
        return {key: value for key, value in vars(self).items() if key != "norm"}


class Trainer:
    """One run's mutable training state: the module, Adam, the schedules, AMP and the generators."""

    def __init__(self, module: nn.Module, parameters: list[nn.Parameter], config: HardenConfig,
                 device: torch.device, total_updates: int):
        self.module = module
        self.config = config
        self.norm = config.norm
        self.optimizer = torch.optim.Adam(parameters, lr=0.0)
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.noise = torch.Generator(device=device).manual_seed(config.seed)
        self.total_updates = total_updates
        self.updates = 0
        self.state: dict[str, torch.Tensor] = {}
        """Tensors a method keeps between minibatches (``free``'s δ)."""

    @property
    def progress(self) -> float:
        """The fraction of training done once the next update is taken."""
        return (self.updates + 1) / self.total_updates

    @property
    def eps(self) -> float:
        return ramped_eps(self.progress, self.config.eps, self.config.eps_warmup)

    @property
    def lr(self) -> float:
        return cyclic_lr(self.progress, self.config.lr_max, self.config.lr_peak)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and logits of ``x``, in float16 under AMP."""
        with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.module(x)
        return F.cross_entropy(logits.float(), y), logits.detach()

    def input_grad(self, loss: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """∇_δ loss, from the scaled loss under AMP (sign and direction are scale-free)."""
        (grad,) = torch.autograd.grad(self.scaler.scale(loss), delta)
        return torch.nan_to_num(grad)

    def update(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss`` at the scheduled learning rate.

        Gradients of any leaf input that requires them (``free``'s δ) are
        left in its ``.grad``, scaled like the loss.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.updates += 1


@dataclass(frozen=True)
class TrainingOutcome:
    """What :func:`train` did: the per-epoch curve, the final check and the counts."""

    curve: tuple[dict, ...]
    final: dict
    epochs_run: int
    """Passes made over the training data (the curve's epochs)."""
    epochs_planned: int
    """Passes a run that is not stopped makes: ``epochs``, or ``⌈epochs/m⌉`` for ``free``."""
    updates: int
    stopped_early: bool
    seconds: float


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def _curve_row(check: Check, trainer: Trainer, losses: float, correct: int, seen: int) -> dict:
    """One point of the training curve: schedules at the check, training loss and accuracy
    on the epoch's adversarial examples, and the guard batch's clean, FGSM and PGD accuracy."""
    progress = trainer.updates / trainer.total_updates
    config = trainer.config
    return {
        "epoch": check.epoch,
        "iteration": check.iteration,
        "eps": _round(ramped_eps(progress, config.eps, config.eps_warmup) if check.iteration else 0.0),
        "lr": _round(cyclic_lr(progress, config.lr_max, config.lr_peak)),
        "loss": _round(losses / seen) if seen else None,
        "train_accuracy": _round(correct / seen) if seen else None,
        **check.accuracies(),
    }


def minibatches(order: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """``order`` in batches of ``size``; a last batch of one image joins the
    one before it (BatchNorm cannot train on a single image)."""
    parts = order.split(size)
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts = (*parts[:-2], torch.cat(parts[-2:]))
    return parts


def largest_batch(size: int) -> int:
    """The most images :func:`minibatches` puts in one batch: ``size`` plus a last single image."""
    return size + 1


def batch_count(images: int, size: int) -> int:
    """How many batches :func:`minibatches` makes of ``images`` images."""
    return len(minibatches(torch.arange(images), size))


def train(module: nn.Module, parameters: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor,
          method: Method, config: HardenConfig, guard: Guard, device: torch.device,
          progress=None) -> TrainingOutcome:
    """Adversarially train ``module`` in place on (``x``, ``y``) with ``method``.

    The guard checks the starting weights, the end of every epoch (one point
    of the curve each), and every ``guard_every`` updates inside longer
    epochs; when it trips it has restored the best weights, and training
    stops. ``progress`` is a :class:`~auditor.progress.TrainingProgress` or ``None``.
    Whatever the module draws from torch's global generator (dropout, say)
    comes from a stream seeded with ``config.seed``, which is put back after.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []  # manual_seed seeds them all
    with torch.random.fork_rng(devices=devices), deterministic_kernels():
        torch.manual_seed(config.seed)
        return _train(module, parameters, x, y, method, config, guard, device, progress)


def _train(module, parameters, x, y, method, config, guard, device, progress) -> TrainingOutcome:
    started = time.perf_counter()
    batches = batch_count(len(y), config.batch_size)
    passes = method.data_passes(config.epochs)
    trainer = Trainer(module, parameters, config, device, passes * batches * method.updates_per_batch)
    order_gen = torch.Generator().manual_seed(config.seed)
    start = guard.measure(module, epoch=0, iteration=0)
    guard.observe(module, start)
    curve = [_curve_row(start, trainer, 0.0, 0, 0)]
    stopped, epoch, checked = False, 0, 0
    while epoch < passes and not stopped:
        epoch += 1
        module.train()
        order = torch.randperm(len(y), generator=order_gen)
        losses, correct, seen, check = 0.0, 0, 0, None
        for index, rows in enumerate(minibatches(order, config.batch_size)):
            result = method.train_batch(trainer, x[rows].to(device), y[rows].to(device))
            if progress is not None:
                progress.advance(epoch=epoch, loss=result.loss)
            if not math.isfinite(result.loss):
                guard.non_finite(module, epoch=epoch, iteration=trainer.updates)
                stopped = True
                break
            losses += result.loss * result.count
            correct += result.correct
            seen += result.count
            if index + 1 < batches and trainer.updates - checked >= config.guard_every:
                checked = trainer.updates
                check = guard.measure(module, epoch=epoch, iteration=checked)
                module.train()
                stopped = guard.observe(module, check)
                if stopped:
                    break
        tripped_here = stopped and check is not None and check.iteration == trainer.updates
        if not tripped_here:  # the epoch's own check (after a non-finite loss: of the restored weights)
            checked = trainer.updates
            check = guard.measure(module, epoch=epoch, iteration=checked)
            stopped = guard.observe(module, check) or stopped
        curve.append(_curve_row(check, trainer, losses, correct, seen))
        if progress is not None:
            progress.advance(0, pgd=check.pgd)
        log.info("epoch %d: loss %s, guard clean %.3f, FGSM %.3f, PGD %.3f",
                 epoch, curve[-1]["loss"], check.clean, check.fgsm, check.pgd)
    final = guard.measure(module, epoch=epoch, iteration=trainer.updates) if stopped else check
    return TrainingOutcome(
        curve=tuple(curve), final=final.accuracies(), epochs_run=epoch, epochs_planned=passes,
        updates=trainer.updates, stopped_early=stopped, seconds=time.perf_counter() - started,
    )
