"""``auditor.scan``: one audit from a model file to a verified results dict.

The flow (design.md §1): load the model adapter and the data, check they fit,
resolve the access level, run preflight checks, run the battery, build
results.json, apply the policy, and write the outputs. The CLI is a thin
layer over this function.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from . import checks as checks_mod
from .access import DEFAULT_BUDGET, MAX_BUDGET, Access, resolve_access
from .attacks.base import MAX_SEED
from .attacks.hardlabel.shared import StartPool
from .battery import (
    Battery, Records, SurrogateSet, build_battery, for_randomised, run_battery, runnable,
    with_coarse_probes,
)
from .data import Dataset, load_data
from .eps import check_radius, default_eps, eps_at_half, eps_key, parse_eps
from .errors import AuditError
from .models import check_channels, check_model_on_data, clean_logits, load_model, normalisation
from .models.base import Model, ModelInfo, seeded_rng
from .models.logits import BeforeSoftmax, attacked_module, logits_before_softmax
from .models.pytorch import WeightsWithoutArch, arch_sha256, deterministic_kernels
from .policy import PolicyResult, load_policy, write_junit
from .progress import ScanProgress
from .report.render import write_report
from .report.schema import SCHEMA
from .results import (
    attack_entry,
    auditor_version,
    dump,
    manifest,
    sample_entries,
    transfer_entry,
)
from .surrogates import ENSEMBLE, Surrogate, examine, file_names, train_surrogates
from .verify import BLACK_BOX_PASSES, VOTES, eps_bound

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class AuditResult:
    """What ``scan`` returns: the results dict plus the verified examples."""

    results: dict
    adversarials: dict[str, np.ndarray]
    """``index``, ``x_adv``, ``distortion``, ``broken_by`` of every sample with a verified
    adversarial example: its smallest distortion found, at any distortion (a
    minimum-norm attack's may lie beyond the largest ε; a sample is broken at
    ε only where its distortion is within ε). Clean errors are left out."""

    @property
    def robust_accuracy(self) -> dict[str, float]:
        """Robust accuracy (0 to 1) at each audited ε, keyed as in results.json:
        the ε as text, ``f"{eps:g}"`` (``"0.3"``, ``"0.0313725"`` for 8/255)."""
        return self.results["robust_accuracy"]

    def robust_accuracy_at(self, eps: float | str) -> float:
        """Robust accuracy at ``eps`` (a number or a fraction such as ``"8/255"``);
        AuditError unless the scan audited that ε."""
        key = eps_key(to_radius(eps))
        if key not in self.robust_accuracy:
            raise AuditError(f"eps {eps} was not audited; audited: {', '.join(self.robust_accuracy)}")
        return self.robust_accuracy[key]

    @property
    def passed(self) -> bool | None:
        """The policy verdict, or ``None`` when no policy was applied."""
        policy = self.results.get("policy")
        return None if policy is None else policy["passed"]

    def samples_frame(self) -> pd.DataFrame:
        """One row per audited sample, indexed by its data index: results.json's
        ``samples`` (label, target, clean_pred, distortion: NaN where no
        example was found, broken_by, queries), plus a ``robust@ε`` column for
        each audited ε, True where the sample has no verified example within ε
        (its mean is ``robust_accuracy[ε]``, up to the 6-decimal rounding)."""
        import pandas as pd

        frame = pd.DataFrame(self.results["samples"]).set_index("index")
        frame["distortion"] = frame["distortion"].astype(float)
        for key in self.robust_accuracy:
            frame[f"robust@{key}"] = ~(frame["distortion"] <= eps_bound(float(key)))
        return frame

    def attacks_frame(self) -> pd.DataFrame:
        """One row per attack, in cascade order, indexed by its name: access,
        kind, norm, the samples it attacked, its success rate, its query
        statistics (``queries_mean`` … ``queries_budget``, as results.json's
        ``attacks[].queries``; ``queries_measure`` says whether they count the
        queries to success or all spent) and its seconds."""
        import pandas as pd

        return pd.DataFrame([
            {"attack": attack["name"], "access": attack["access"], "kind": attack["kind"], "norm": attack["norm"],
             "samples": attack["samples"], "success_rate": attack["success_rate"],
             **{f"queries_{key}": attack["queries"].get(key)
                for key in ("measure", "mean", "median", "p90", "max", "total", "budget")},
             "seconds": attack["seconds"]}
            for attack in self.results["attacks"]
        ]).set_index("attack")


def _is_integer(value) -> bool:
    """An integer, and not a bool (``True`` is an ``int`` to Python, not to a user)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_data_spec(data, flag: str = "data") -> None:
    """AuditError unless ``data`` names data the way the API takes it: a path
    or a name, not arrays, and not empty (which would read the working
    directory as an image folder)."""
    if not isinstance(data, (str, os.PathLike)):
        raise AuditError(
            f"{flag} must be mnist, the path of a .npz with x and y, or an image folder, "
            f"got {type(data).__name__} (save arrays with numpy.savez)"
        )
    if not str(data):
        raise AuditError(f"{flag} is empty: give mnist, the path of a .npz with x and y, or an image folder")


def to_radius(value: float | str) -> float:
    """One ``eps`` of the Python API as a float: a number or a fraction such as
    ``"8/255"``; AuditError unless a finite number (its range is checked apart)."""
    try:
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Real, np.ndarray, torch.Tensor)):
            raise TypeError(f"{value!r} is not a radius")
        radius = parse_eps(value) if isinstance(value, str) else float(value)
    except (TypeError, ValueError) as error:
        raise AuditError(f"--eps: {error}") from None
    if not math.isfinite(radius):
        raise AuditError(f"--eps must be finite, got {radius:g}")
    return radius


def resolve_eps(
    shape: Sequence[int], norm: str, eps: float | str | Sequence[float | str] | None
) -> tuple[float, ...]:
    """The radii of a scan on images of ``shape`` (C, H, W): the defaults for
    that kind of image, or those given (one number or fraction, ``"8/255"``,
    or several). A radius must be one that leaves the image somewhere to go:
    at most 1 in L∞, at most the diameter √(C·H·W) of the pixel cube in L2."""
    if norm not in ("linf", "l2"):
        raise AuditError(f"unknown norm {norm!r}; use linf or l2")
    if eps is not None and (isinstance(eps, str) or np.ndim(eps) == 0):
        eps = (eps,)
    if eps is not None:
        eps = [to_radius(value) for value in eps]
    if not eps:
        return default_eps(shape, norm)
    for value in eps:
        check_radius(value, norm, shape)
    # one radius per results key: 8/255 and 0.0313725 are the same row
    return tuple(sorted({eps_key(value): float(value) for value in eps}.values()))


def resolve_targets(
    target: str | int | None, logits: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int,
    indices: Sequence[int],
) -> tuple[torch.Tensor | None, torch.Tensor, dict | None]:
    """Targets for a targeted audit: (targets or None, samples kept, threat entry).

    ``random``: a class other than the label, drawn per sample from the seed
    and the sample's data set index (``indices``), so a sample keeps its
    target in any subset (``-n``); ``least-likely``: the class other than
    the label that the model scores lowest in ``logits``, its clean logits
    (the auditor's choice of target, not a query of the attacker); a class
    index: that class, and samples of that class are left out (no image can
    be pushed to its own label).
    """
    everyone = torch.ones(len(y), dtype=torch.bool)
    if target is None:
        return None, everyone, None
    if target == "random":
        draws = [_draw(seed, int(index)) for index in indices]
        shift = torch.tensor([1 + draw % (num_classes - 1) for draw in draws], dtype=torch.long)
        return (y + shift) % num_classes, everyone, {"mode": "random"}
    if target == "least-likely":
        scores = logits.double()
        scores.scatter_(1, y[:, None], float("inf"))  # a target is never the label
        return scores.argmin(1), everyone, {"mode": "least-likely"}
    if isinstance(target, str) and not re.fullmatch("[0-9]+", target):  # int() takes " 3", "+3", "٣"
        raise AuditError(f"--target must be random, least-likely or a class index, got {target!r}")
    if isinstance(target, str) and len(target.lstrip("0")) > len(str(num_classes)):  # int() refuses 4,301 digits
        raise AuditError(f"--target {target[:20]}… is not a class of this {num_classes}-class model")
    chosen = int(target)
    if not 0 <= chosen < num_classes:
        raise AuditError(f"--target {chosen} is not a class of this {num_classes}-class model")
    keep = y != chosen
    if not keep.any():
        raise AuditError(f"--target {chosen}: every sample already has label {chosen}")
    entry = {"mode": "class", "class": chosen, "left_out": int((~keep).sum())}
    return torch.full((int(keep.sum()),), chosen, dtype=torch.long), keep, entry


def _draw(seed: int, index: int) -> int:
    """A 64-bit number drawn from ``seed`` for the data set image ``index``."""
    digest = hashlib.blake2b(str(index).encode(), digest_size=8, key=f"{seed}:target".encode()).digest()
    return int.from_bytes(digest, "little")


def resolve_surrogates(
    paths: Sequence[str | Path], train: int, dataset: Dataset, x: torch.Tensor, y: torch.Tensor,
    num_classes: int, seed: int, trust_pickle: bool = False,
) -> tuple[list[Surrogate], tuple[SurrogateSet, ...]]:
    """The surrogate models of a scan and the sets transfer attacks run on.

    ``paths`` load as a model file with its own architecture does
    (TorchScript, ``torch.export``, ONNX, or a pickle with ``trust_pickle``),
    must give gradients and have the model's ``num_classes``; ``train``
    more are trained (or read from the cache) on the built-in training
    split. Each surrogate alone is a set, and with two or more their
    ensemble (averaged logits) is one more; every set has its own name
    (:func:`~auditor.surrogates.file_names`). Each is examined on the
    audit's samples (:func:`~auditor.surrogates.examine`: clean accuracy,
    randomness, all-zero gradients), with torch's global generator seeded
    from ``seed``. A surrogate that returns probabilities is attacked
    on the logits beneath its final softmax where that layer can be found
    (:mod:`auditor.models.logits`).
    """
    if train < 0:
        raise AuditError(f"--train-surrogates must be >= 0, got {train}")
    found = []
    with seeded_rng(seed, "surrogates"):  # a randomised surrogate draws the same numbers in every run
        for name, path in zip(file_names(paths), paths):
            try:
                model = load_model(path, device="cpu", trust_pickle=trust_pickle,
                                   image_shape=tuple(dataset.x.shape[1:]))
                classes = check_model_on_data(model, dataset)
            except WeightsWithoutArch as exc:  # --arch builds the audited model only
                raise AuditError(f"surrogate {path} is a weights file: a surrogate must be a model file with its "
                                 "own architecture (TorchScript, .pt2 or ONNX)") from exc
            except AuditError as exc:
                raise AuditError(f"surrogate {path}: {exc}") from exc
            module = model.torch_module()
            if module is None:
                raise AuditError(f"surrogate {path} has no differentiable form: {model.access_ceiling[1]}")
            if classes != num_classes:
                raise AuditError(f"surrogate {path} has {classes} classes, the model {num_classes}")
            module, _ = attacked_module(module, x[:64])  # the logits beneath a final softmax, if any
            found.append(examine(Surrogate(name, module.eval(), str(path), model.info.sha256), x, y))
        if train:
            if dataset.name != "mnist":
                raise AuditError("--train-surrogates needs a training split; only --data mnist has one")
            evaluate = Dataset("audit samples", x, y)
            found += train_surrogates(load_data("mnist", split="train"), train, num_classes=num_classes,
                                      seed=seed, evaluate=evaluate)
    sets = [SurrogateSet(s.name, (s.module,)) for s in found]
    if len(found) > 1:
        sets.append(SurrogateSet(ENSEMBLE, tuple(s.module for s in found)))
    return found, tuple(sets)


@deterministic_kernels()
def scan(
    model: str | Path,
    data: str = "mnist",
    *,
    access: str = "auto",
    samples: int | None = None,
    norm: str = "linf",
    eps: float | str | Sequence[float | str] | None = None,
    budget: int = DEFAULT_BUDGET,
    attacks: Sequence[str] | None = None,
    target: str | int | None = None,
    surrogates: Sequence[str | Path] = (),
    train_surrogates: int = 0,
    arch: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    trust_pickle: bool = False,
    policy: str | Path | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    command: str | None = None,
) -> AuditResult:
    """Audit ``model`` on ``data`` and return the verified results.

    The Python form of ``auditor scan``; each parameter is the CLI option of
    the same name.

    Parameters
    ----------
    model : str or Path
        The model file: ONNX, TorchScript, ``torch.export`` (``.pt2``),
        safetensors or a ``torch.save`` state_dict (with ``arch``), or a
        pickled module (with ``trust_pickle``).
    data : str or Path, default ``"mnist"``
        ``"mnist"`` (the built-in test split), a ``.npz`` with ``x`` and
        ``y``, or an image folder with one subfolder per class.
    access : str, default ``"auto"``
        What the attacker sees: ``none``, ``hard-label``, ``soft-label`` or
        ``white-box``; ``auto`` takes the most the model file allows.
    samples : int, optional
        Audit a class-balanced subset of this many samples (default: all).
    norm : str, default ``"linf"``
        The threat norm, ``linf`` or ``l2``.
    eps : float, str or sequence of them, optional
        The radii, numbers or fractions (``"8/255"``). Default: 0.1, 0.2, 0.3
        (linf) or 1, 1.5, 2 (l2) for greyscale images up to 32x32, else
        2/255, 4/255, 8/255 or 0.25, 0.5, 1.
    budget : int, default 5000
        Queries per sample for each run of a black-box attack: a fixed-ε
        attack runs once per ε, a minimum-norm attack once for all ε.
    attacks : str or sequence of str, optional
        Attack names (``auditor attacks``), or one string ``"a,b"``; a name
        without its norm (``fgsm``) means the threat norm's variant.
        Default: the whole battery of the access level.
    target : str or int, optional
        Makes the audit targeted: ``random``, ``least-likely`` or a class
        index. Only targeted attacks run, and an attack breaks a sample only
        where the model outputs its target (a sample misclassified before any
        attack counts as broken).
    surrogates : str, Path or sequence of them, default ()
        Surrogate model files for the transfer attacks (TorchScript, ``.pt2``
        or ONNX with the model's classes and their own normalisation).
    train_surrogates : int, default 0
        Train (or read from the cache) this many zoo surrogates on the
        built-in training split. Transfer attacks run at every access level
        with surrogates, and alone at ``access="none"``.
    arch : str, optional
        ``module:factory`` or ``file.py:factory`` building the network, for
        weights files only.
    mean, std : float or sequence of float, optional
        Input normalisation folded into the model: one value, or one per
        channel; a missing one is 0 (mean) or 1 (std).
    trust_pickle : bool, default False
        Allow a pickled module (runs code from the file).
    policy : str or Path, optional
        Policy YAML, or a shipped name (``default``, ``strict``), applied to
        the results (see :attr:`AuditResult.passed`).
    out : str or Path, optional
        Folder for results.json, adversarials.npz, report.html, report.pdf
        (and junit.xml with a policy); nothing is written if anything fails.
    seed : int, default 0
        Seed of every random choice; the same seed gives the same results.
    device : str, default ``"auto"``
        ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
    progress : bool, default False
        Show a progress bar on stderr.
    command : str, optional
        The command line recorded in results.json's manifest.

    Returns
    -------
    AuditResult
        The results dict (results.json) and the verified adversarial examples.

    Raises
    ------
    AuditError
        Bad input: a model, data set, policy, output folder or parameter value
        that cannot be used, with a one-line message.
    """
    started_at, started = datetime.now(timezone.utc), time.perf_counter()
    for name, value in (("--out", out), ("--policy", policy)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise AuditError(f"{name} must be a path, got {repr(value)[:60]}")
    _remove_earlier_verdict(out)
    budget, seed, samples, train_surrogates = _checked_counts(budget, seed, samples, train_surrogates)
    check_data_spec(data)
    attacks, surrogates = _checked_names(attacks, target, surrogates)
    mean, std = normalisation(mean, std)
    if out is not None:
        check_writable(out)
    gate = load_policy(policy) if policy is not None else None
    dataset = load_data(data)
    check_channels(mean, std, dataset.x.shape[1], f"data {dataset.name} has")
    eps_list = resolve_eps(tuple(dataset.x.shape[1:]), norm, eps)
    adapter = load_model(model, arch=arch, mean=mean, std=std, trust_pickle=trust_pickle, device=device,
                         image_shape=tuple(dataset.x.shape[1:]))
    with seeded_rng(seed, "check"):  # a randomised model passes or fails the same way in every run
        num_classes = check_model_on_data(adapter, dataset)
    level, reason = resolve_access(access, *adapter.access_ceiling)
    chosen = build_battery(
        level, norm, attacks, targeted=target is not None, transfer=bool(surrogates) or train_surrogates != 0
    )
    battery = runnable(chosen, budget, tuple(dataset.x.shape[1:]), num_classes)

    indices = dataset.balanced_indices(samples)
    if samples is not None and samples > len(dataset):
        log.warning("-n %d: the data has %d images; all of them are audited", samples, len(dataset))
    x, y = dataset.x[indices], dataset.y[indices]
    # a randomised model (dropout left on) draws from torch's global generator: seeded, a seed
    # gives the same results.json; each attack run seeds it again (run_battery)
    with seeded_rng(seed, "model"):
        logits = clean_logits(adapter, x, dataset)
        targets, keep, target_entry = resolve_targets(target, logits, y, num_classes, seed, indices)
        indices, x, y, logits = indices[keep], x[keep], y[keep], logits[keep]
        surrogate_models, surrogate_sets = resolve_surrogates(
            surrogates, train_surrogates, dataset, x, y, num_classes, seed, trust_pickle
        )
        ready = _preflight(adapter, chosen, battery, level, x, y, seed, budget, num_classes)
        adapter, battery, probabilities, votes = ready.adapter, ready.battery, ready.probabilities, ready.votes
        found = list(ready.checks)
        with ScanProgress(enabled=progress) as bar:
            outcome = run_battery(
                battery, adapter, x, y, eps_list=eps_list, budget=budget, seed=seed,
                outputs_probabilities=probabilities, target=targets, progress=bar,
                starts=StartPool(dataset.x, dataset.y, torch.arange(len(dataset))),
                surrogates=surrogate_sets, clean_logits=logits, votes=votes,
            )
        clean_accuracy = (outcome.clean_pred == y).double().mean().item()
        found += checks_mod.low_clean_accuracy(clean_accuracy)
        found += checks_mod.surrogate_checks(surrogate_models)
        found += checks_mod.small_budget(level, budget, BLACK_BOX_PASSES if votes > 1 else 1)
        found += checks_mod.saturated_scores(battery, logits, probabilities, y, outcome.clean_pred == y)
        found += checks_mod.weaker_attack_wins(outcome.records, outcome.attacks, eps_list)
        found += checks_mod.non_monotone(outcome.attacks, votes > 1)
        no_start = checks_mod.no_target_image(battery, targets, dataset.y)
        found += checks_mod.noise_beats_attacks(outcome.attacks, could_not_start=bool(no_start))
        found += checks_mod.no_adversarial_found(outcome.records, outcome.attacks)
        if level == Access.WHITE_BOX:
            found += checks_mod.unbounded_attack(adapter, x, y, norm, seed, votes)
        found += checks_mod.skipped_attacks(battery.skipped)
        found += checks_mod.no_gradient_attack(battery)
        found += no_start
        found += checks_mod.custom_battery(battery.left_out)
        found += checks_mod.access_limited(level, reason)

    results = {
        "schema": SCHEMA,
        "auditor_version": auditor_version(),
        "seed": seed,
        "started": started_at.isoformat(timespec="seconds"),
        "seconds": None,
        "model": _model_entry(model, adapter.info, tuple(x.shape[1:]), num_classes, arch, mean, std),
        "data": {"name": dataset.name, "n": len(y), "sha256": dataset.sha256,
                 **({"classes": list(dataset.classes)} if dataset.classes else {})},
        "access": {"level": level.cli_name, "reason": reason},
        "threat": {"norm": norm, "eps": list(eps_list), "budget": budget, "target": target_entry},
        "clean_accuracy": round(clean_accuracy, 6),
        "robust_accuracy": {
            eps_key(e): round(v, 6) for e, v in outcome.records.robust_accuracy(eps_list).items()
        },
        "eps_50": eps_at_half(outcome.records.distortion.tolist()),
        "attacks": [attack_entry(report, indices.tolist()) for report in outcome.attacks],
        "transfer": transfer_entry(surrogate_models, surrogate_sets, outcome.attacks, eps_list),
        "samples": sample_entries(indices.tolist(), y, outcome, targets),
        "checks": [check.to_dict() for check in found],
        "manifest": manifest(command or "auditor.scan() from Python", str(adapter.device)),
    }
    verdict = gate.evaluate(results) if gate is not None else None
    if verdict is not None:
        results["policy"] = verdict.to_dict()
    results["seconds"] = round(time.perf_counter() - started, 3)

    audit = AuditResult(results=results, adversarials=_adversarials(indices, outcome.records))
    if out is not None:
        write_outputs(audit, Path(out), verdict)
    return audit


def _checked_counts(budget, seed, samples, train_surrogates) -> tuple[int, int, int | None, int]:
    """``scan``'s integer arguments, checked (an integer, not a bool, in range) and as ints."""
    for name, value in (("--budget", budget), ("--seed", seed), ("-n/--samples", samples),
                        ("--train-surrogates", train_surrogates)):
        if value is not None and not _is_integer(value):
            raise AuditError(f"{name} must be an integer, got {value!r}")
    budget, seed, train_surrogates = int(budget), int(seed), int(train_surrogates)
    samples = None if samples is None else int(samples)
    if not 1 <= budget <= MAX_BUDGET:
        raise AuditError(f"--budget must be between 1 and 2^62, got {budget}")
    if not 0 <= seed <= MAX_SEED:
        raise AuditError(f"--seed must be between 0 and 2^63 - 1, got {seed}")
    if samples is not None and samples < 1:
        raise AuditError(f"-n/--samples must be >= 1, got {samples}")
    return budget, seed, samples, train_surrogates


def _checked_names(attacks, target, surrogates) -> tuple[list[str] | None, Sequence[str | os.PathLike]]:
    """``scan``'s attack names (a list, or one string ``"a,b"``) and surrogate
    paths (a list, or one path), checked, and the type of ``target``."""
    if isinstance(attacks, str):
        attacks = [name.strip() for name in attacks.split(",")]
    if attacks is not None and (
        not isinstance(attacks, Sequence) or not all(isinstance(name, str) for name in attacks)
    ):
        raise AuditError(f"attacks must be attack names (a list, or one string 'a,b'), got {repr(attacks)[:60]}")
    if target is not None and not isinstance(target, str) and not _is_integer(target):
        raise AuditError(f"--target must be random, least-likely or a class index, got {target!r}")
    if isinstance(surrogates, (str, os.PathLike)):
        surrogates = (surrogates,)
    if not isinstance(surrogates, Sequence) or not all(isinstance(path, (str, os.PathLike)) for path in surrogates):
        raise AuditError(f"surrogates must be model paths (a list, or one path), got {repr(surrogates)[:60]}")
    return attacks, surrogates


@dataclass(frozen=True)
class _Ready:
    """The model and battery as the attacks will meet them, after the preflight checks."""

    adapter: Model
    """The model, or at white-box its copy with a final softmax removed."""
    battery: Battery
    """The battery as it runs: for a randomised model with EOT, votes and
    coarse probes, and without the attacks that votes leave unable to pay a
    step; with coarse probes for a model with input steps."""
    probabilities: bool
    """The model outputs probabilities."""
    votes: int
    """Passes a label is the most frequent of: ``VOTES`` for a randomised model, else 1."""
    checks: tuple[checks_mod.Check, ...]


def _preflight(adapter: Model, chosen: Battery, battery: Battery, level: Access, x: torch.Tensor,
               y: torch.Tensor, seed: int, budget: int | None, num_classes: int) -> _Ready:
    """Run the checks that need the model before the battery, on the first 64
    samples, and adapt to what they find: a randomised model gets labels by
    vote, APGD with EOT and answers by vote, which leave ``budget`` fewer
    answers (the ``chosen`` battery is priced again, so that an attack that
    can no longer pay a step is skipped, with that reason); a randomised one
    or one with input steps, HopSkipJump with coarse probes; a white-box
    model that outputs probabilities has its final softmax removed where
    possible (``softmax-removed``), and its gradients are checked.
    ``battery``: ``chosen`` as it runs on a deterministic model."""
    first = checks_mod.preflight(adapter, x[:64], seed)
    found = []
    shape, d = tuple(x.shape[1:]), x[0].numel()
    if first.randomised:
        battery = runnable(for_randomised(chosen, d), budget, shape, num_classes, randomised=True)
        rows = x[:checks_mod.RANDOMNESS_ROWS].to(adapter.device)
        found.append(checks_mod.randomised_model(adapter, rows, seed, battery.attacks))
    elif first.steps is not None:
        battery = with_coarse_probes(battery, d)
        found.append(checks_mod.steps_check(first.steps, battery.attacks))
    if level == Access.WHITE_BOX and first.probabilities:
        logits_module = logits_before_softmax(adapter.torch_module(), x[:64].to(adapter.device))
        if logits_module is not None:
            adapter = BeforeSoftmax(adapter, logits_module)
        found.append(checks_mod.final_softmax(removed=logits_module is not None))
    if level == Access.WHITE_BOX:
        found += checks_mod.gradient_checks(adapter, x[:64], y[:64])
    return _Ready(adapter, battery, first.probabilities, VOTES if first.randomised else 1, tuple(found))


def _model_entry(model: str | Path, info: ModelInfo, input_shape: tuple[int, ...], num_classes: int,
                 arch: str | None, mean: Sequence[float] | None, std: Sequence[float] | None) -> dict:
    """results.json's ``model``: the file, what was audited of it and how it was loaded."""
    return {
        "path": str(model),
        "format": info.format,
        "sha256": info.sha256,
        "input_shape": list(input_shape),
        **({"input_layout": "NHWC"} if info.channels_last else {}),
        **({"output": info.output} if info.output is not None else {}),
        "num_classes": num_classes,
        **({"arch": arch, "arch_sha256": arch_sha256(arch)} if arch else {}),
        **({"normalisation": {
            "mean": [float(v) for v in (mean if mean is not None else (0.0,))],
            "std": [float(v) for v in (std if std is not None else (1.0,))],
        }} if mean is not None or std is not None else {}),
    }


def _adversarials(indices: torch.Tensor, records: Records) -> dict[str, np.ndarray]:
    """adversarials.npz: every sample's smallest verified adversarial example (clean errors left out)."""
    broken = (records.distortion > 0) & torch.isfinite(records.distortion)
    return {
        "index": indices[broken].numpy(),
        "x_adv": records.x_adv[broken].numpy(),
        "distortion": records.distortion[broken].numpy(),
        "broken_by": records.broken_by[broken.numpy()].astype(str),
    }


OUTPUT_ORDER = ("adversarials.npz", "junit.xml", "report.html", "report.pdf", "results.json")
"""The order outputs move into place: results.json, which the others are
read against, last."""


def _remove_earlier_verdict(out: str | Path | None) -> None:
    """Delete the junit.xml of an earlier run in ``out`` before anything can
    fail: CI publishing junit.xml whatever the exit code would show its
    verdict for this run. Nothing else goes (a bad flag must not cost the
    earlier results); an ``out`` that cannot hold it is refused later."""
    if out is None or not str(out):
        return
    junit = Path(out) / "junit.xml"
    if junit.is_file():
        junit.unlink()


def check_writable(out: str | Path) -> None:
    """Refuse, before any work, an ``out`` that cannot become a folder of
    outputs: empty (the working directory), a file, inside a file, or
    without write permission."""
    if not str(out):
        raise AuditError("--out is empty: give the folder for the outputs")
    out = Path(out)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AuditError(f"cannot write to {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AuditError(f"cannot write to {out}: permission denied on {existing}")
    for name in OUTPUT_ORDER:
        if (out / name).is_dir():
            raise AuditError(f"cannot write to {out / name}: it is a folder")


def write_outputs(audit: AuditResult, out: Path, verdict: PolicyResult | None = None) -> None:
    """Write results.json, the report, junit.xml and adversarials.npz to ``out``.

    Everything is staged in a temporary folder inside ``out`` and moved into
    place only when all of it was written, results.json last; if a move
    fails, the files already moved are taken out and the earlier run's put
    back, so a failure leaves no new file (nor ``out`` itself, if it made
    it). Without a verdict, a junit.xml left by an earlier run with a policy
    is removed: it would report that verdict.
    """
    check_writable(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = None
    try:
        stage = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
        (stage / "results.json").write_text(dump(audit.results))
        write_report(audit.results, stage)
        np.savez_compressed(stage / "adversarials.npz", **audit.adversarials)
        if verdict is not None:
            write_junit(verdict, stage / "junit.xml")
        move_into_place(stage, out, OUTPUT_ORDER)
        if verdict is None:
            (out / "junit.xml").unlink(missing_ok=True)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)


def move_into_place(stage: Path, out: Path, order: Sequence[str]) -> None:
    """Move the staged outputs (files or folders) into ``out`` in ``order``,
    keeping what they replace in ``stage`` until all have moved; on failure undo."""
    moved, kept = [], []
    try:
        for name in order:
            if not (stage / name).exists():
                continue
            if (out / name).exists():
                (out / name).replace(stage / f"earlier-{name}")
                kept.append(name)
            (stage / name).replace(out / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            if (out / name).is_dir() and not (out / name).is_symlink():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink(missing_ok=True)
        for name in kept:
            (stage / f"earlier-{name}").replace(out / name)
        raise
