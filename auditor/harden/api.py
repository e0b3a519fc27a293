"""``auditor.harden``: adversarial fine-tuning of a model file, exported in its own format.

The flow: validate the configuration, load the training data and the model
(checked on the data), scan the model as it is (white-box, ``before/``),
train it with the chosen method under the guard (:mod:`.train`,
:mod:`.guard`), write it back in the input's format and check the written
file against the trained module (:mod:`.export`), scan the written file with
the same settings (``after/``), and write ``hardening.json``, a
``results.json`` (the after-scan plus the ``hardening`` record) and the
report with its "Hardening" section. Everything is staged in a temporary
folder inside ``out`` and moved into place only when all of it was written.
The CLI's ``harden`` command is a thin layer over :func:`harden`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..access import DEFAULT_BUDGET
from ..checks import Check, training_data_audited
from ..data import Dataset, load_data
from ..eps import check_radius
from ..errors import AuditError
from ..models import check_channels, check_model_on_data, load_model, normalisation
from ..models.base import seeded_rng
from ..models.pytorch import resolve_device
from ..progress import TrainingProgress
from ..report.render import write_report
from ..results import auditor_version, dump
from ..scan import (
    OUTPUT_ORDER, AuditResult, check_data_spec, check_writable, move_into_place, scan, to_radius, write_outputs,
)
from .config import HardenConfig
from .export import export, hardened_name
from .guard import Guard
from .methods import METHODS
from .train import TrainingOutcome, batch_count, train
from .trainable import logits_to_train, make_trainable

log = logging.getLogger(__name__)

SCHEMA = "auditor.hardening/1"
CHECK_ROWS = 64
ACCESS_REASON = "auditor harden evaluates white-box: training itself uses the model's gradients"
"""Why the before and after scans ran white-box (no --access was given)."""
"""Training images on which the written model must reproduce the trained module's logits."""
CONFIG_FIELDS = {field.name for field in dataclasses.fields(HardenConfig)}


@dataclass(frozen=True)
class HardenResult:
    """What :func:`harden` returns: the record (``hardening.json``), the written model and both scans."""

    record: dict
    model_path: Path
    before: AuditResult
    after: AuditResult
    network: nn.Module
    """The trained network (without normalisation), in eval mode."""

    @property
    def curve(self) -> list[dict]:
        """Per epoch (0: the starting model): loss, and clean/FGSM/PGD accuracy on the guard batch."""
        return self.record["curve"]

    @property
    def guard_events(self) -> list[dict]:
        return self.record["guard"]["events"]

    @property
    def rolled_back(self) -> bool:
        return any(event["action"] == "rollback" for event in self.guard_events)

    @property
    def training_seconds(self) -> float:
        return self.record["training_seconds"]


def _split(dataset: Dataset, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(guard rows, training rows): a class-balanced held-out batch and the rest."""
    if size >= len(dataset):
        raise AuditError(f"--guard-size {size} leaves no training data ({len(dataset)} images)")
    guard = dataset.balanced_indices(size)
    keep = torch.ones(len(dataset), dtype=torch.bool)
    keep[guard] = False
    return guard, keep.nonzero().flatten()


def _check_same_classes(training: Dataset, evaluation: Dataset) -> None:
    """AuditError where both data sets name their classes (image folders) and
    the names differ: label 0 of one would be scored as label 0 of the other."""
    if training.classes is None or evaluation.classes is None or training.classes == evaluation.classes:
        return
    pairs = zip(evaluation.classes, training.classes)
    label = next((label for label, (one, other) in enumerate(pairs) if one != other),
                 min(len(evaluation.classes), len(training.classes)))
    named = [repr(classes[label]) if label < len(classes) else "missing"
             for classes in (evaluation.classes, training.classes)]
    raise AuditError(
        f"--eval-data {evaluation.name} and the training data {training.name} name their classes differently "
        f"({len(evaluation.classes)} and {len(training.classes)} classes; label {label} is {named[0]} and "
        f"{named[1]}): the labels must mean the same classes in both"
    )


def _audited_training_images(
    before: AuditResult, evaluation: Dataset, training: Dataset, guard_rows: torch.Tensor
) -> list[Check]:
    """The check ``training-data-audited``: the images the scans audited
    that are training images too, compared pixel for pixel (by a hash of
    each image), so a shared subset is found as well as the same file."""
    audited = evaluation.x[[sample["index"] for sample in before.results["samples"]]]
    rows = {_fingerprint(image): row for row, image in enumerate(training.x)}
    found = [rows[key] for key in map(_fingerprint, audited) if key in rows]
    guard = int(torch.isin(torch.tensor(found, dtype=torch.long), guard_rows).sum())
    return training_data_audited(len(found), len(audited), guard)


def _fingerprint(image: torch.Tensor) -> bytes:
    return hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest()


def _summary(audit: AuditResult, relative: str) -> dict:
    results = audit.results
    return {"clean_accuracy": results["clean_accuracy"], "robust_accuracy": results["robust_accuracy"],
            "results": relative}


SCAN_FOLDERS = ("before", "after")
"""The folders of ``out`` that hold the two scans' outputs, replaced whole by a run."""
LAST = ("hardening.json", "results.json")
"""Outputs moved into place after all others, in this order: the record the rest is read against last."""


def _check_scan_folders(out: Path) -> None:
    """Refuse, before any work, an ``out`` whose ``before``/``after`` is
    anything but a folder of an earlier run's scan outputs: a run replaces
    them whole, and must not delete what auditor did not write."""
    for name in SCAN_FOLDERS:
        folder = out / name
        if not folder.exists() and not folder.is_symlink():
            continue
        if folder.is_symlink() or not folder.is_dir():
            raise AuditError(f"cannot write to {folder}: it is not a folder of an earlier harden run")
        foreign = sorted(path.name for path in folder.iterdir() if path.name not in OUTPUT_ORDER)
        if foreign:
            raise AuditError(
                f"cannot write to {folder}: it holds {foreign[0]}, which auditor did not write "
                "(move it away or choose another --out)"
            )


def _output_order(stage: Path) -> list[str]:
    """The staged outputs, :data:`LAST` last; the scan folders (checked by
    :func:`_check_scan_folders`) replace the earlier ones whole."""
    return sorted((path.name for path in stage.iterdir()), key=lambda name: LAST.index(name) + 1 if name in LAST else 0)


def harden(
    model: str | Path,
    data: str = "mnist",
    *,
    eps: float | str,
    out: str | Path,
    norm: str = "linf",
    method: str = "fast",
    epochs: int | None = None,
    guard: bool = True,
    seed: int = 0,
    eval_data: str | None = None,
    samples: int | None = None,
    budget: int = DEFAULT_BUDGET,
    arch: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    trust_pickle: bool = False,
    device: str = "auto",
    progress: bool = False,
    command: str | None = None,
    **options,
) -> HardenResult:
    """Adversarially fine-tune ``model`` on ``data`` and write it, hardened, to ``out``.

    ``data`` is ``mnist`` (its train split), a ``.npz`` or an image folder;
    the before/after scans run on ``eval_data`` (default: the same spec, so
    the test split for ``mnist``) at white-box access, with ``samples``,
    ``budget``, ``seed`` and the single radius ``eps`` in ``norm`` (a number
    or a fraction such as ``"8/255"``, as for :func:`auditor.scan`).
    ``epochs`` defaults to :class:`HardenConfig`'s (20); ``options`` are
    further :class:`HardenConfig` fields (``batch_size``,
    ``lr_max``, ``alpha``, ``guard_size``, ``guard_every``, ``guard_drop``,
    ...); ``random_init`` (``fast``), ``steps`` (``pgd``) and ``replays``
    (``free``) are refused for the other methods.

    ``out`` receives ``<name>-hardened<suffix>`` (the input's format),
    ``before/`` and ``after/`` (full scan outputs), ``hardening.json``,
    ``results.json`` and ``report.html``/``report.pdf``; nothing is written
    if anything fails (nor is ``out`` left behind, if this call made it).
    """
    started_at, started = datetime.now(timezone.utc), time.perf_counter()
    unknown = sorted(set(options) - CONFIG_FIELDS)
    if unknown:
        raise AuditError(f"unknown hardening option(s): {', '.join(unknown)}")
    if epochs is not None:
        options["epochs"] = epochs
    eps = to_radius(eps)
    check_writable(out)
    _check_scan_folders(Path(out))
    check_data_spec(data)
    if eval_data is not None:
        check_data_spec(eval_data, "eval_data")
    mean, std = normalisation(mean, std)
    if method not in METHODS:
        raise AuditError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    config = HardenConfig(eps=eps, norm=norm, method=method, guard=guard, seed=seed, **options)
    trainer_method = METHODS[config.method](config)
    source = Path(model)
    training_data = load_data(data, split="train")
    check_channels(mean, std, training_data.x.shape[1], f"data {training_data.name} has")
    check_radius(config.eps, config.norm, tuple(training_data.x.shape[1:]))
    evaluation = eval_data or data
    evaluation_data = load_data(evaluation)
    _check_same_classes(training_data, evaluation_data)
    image_shape = tuple(training_data.x.shape[1:])  # the size a graph with symbolic H, W is checked at
    with seeded_rng(seed, "check"):
        check_model_on_data(load_model(model, arch=arch, mean=mean, std=std, trust_pickle=trust_pickle,
                                       device="cpu", image_shape=image_shape), training_data)
    raw = load_model(model, arch=arch, trust_pickle=trust_pickle, device="cpu", image_shape=image_shape)
    train_device = resolve_device(device)
    trainable = make_trainable(raw, source, mean, std, train_device)
    trained = logits_to_train(trainable.module, training_data.x[:CHECK_ROWS].to(train_device), raw.info.path)
    guard_rows, train_rows = _split(training_data, config.guard_size)
    guard_x, guard_y = training_data.x[guard_rows], training_data.y[guard_rows]
    monitor = Guard(guard_x.to(train_device), guard_y.to(train_device), eps=config.eps, norm=config.norm,
                    steps=config.guard_steps, drop=config.guard_drop, enabled=config.guard)
    scan_options = dict(access="white-box", samples=samples, norm=norm, eps=[eps], budget=budget,
                        seed=seed, device=device, progress=progress,
                        command=command or "auditor.harden() from Python")

    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
    try:
        before = scan(model, evaluation, arch=arch, mean=mean, std=std, trust_pickle=trust_pickle,
                      **scan_options)
        before.results["access"]["reason"] = ACCESS_REASON
        audited_training = [check.to_dict() for check in _audited_training_images(before, evaluation_data,
                                                                                   training_data, guard_rows)]
        before.results["checks"] += audited_training
        write_outputs(before, stage / "before")
        x, y = training_data.x[train_rows], training_data.y[train_rows]
        batches = trainer_method.data_passes(config.epochs) * batch_count(len(y), config.batch_size)
        with TrainingProgress(progress, f"harden {config.method}", batches) as bar:
            outcome = train(trained, list(trainable.parameters), x, y, trainer_method, config,
                            monitor, train_device, bar)
        name = hardened_name(source)
        diff = export(trainable, raw.info.format, source, stage / name, x[:CHECK_ROWS], arch=arch,
                      trust_pickle=trust_pickle)
        after = scan(stage / name, evaluation, arch=arch, mean=mean, std=std, trust_pickle=trust_pickle,
                     **scan_options)
        after.results["model"]["path"] = str(out / name)
        after.results["access"]["reason"] = ACCESS_REASON
        after.results["checks"] += audited_training
        write_outputs(after, stage / "after")
        training_sha256 = training_data.sha256  # the scans ran on the training data if theirs has this hash
        record = {
            "schema": SCHEMA,
            "auditor_version": auditor_version(),
            "seed": seed,
            "started": started_at.isoformat(timespec="seconds"),
            "seconds": None,
            "training_seconds": round(outcome.seconds, 3),
            "method": {"name": trainer_method.name, "label": trainer_method.label,
                       "paper": trainer_method.paper, "params": trainer_method.params},
            "config": config.to_dict(),
            "threat": {"norm": config.norm, "eps": config.eps},
            "device": {"name": str(train_device), "amp": train_device.type == "cuda"},
            # with the --arch and --mean/--std that the hardened file must be scanned with too
            "model": {"path": str(model), "format": raw.info.format, "sha256": raw.info.sha256,
                      **{key: value for key, value in after.results["model"].items()
                         if key in ("arch", "normalisation")}},
            "output": {"path": str(out / name), "format": raw.info.format,
                       "sha256": after.results["model"]["sha256"],
                       "check": {"images": len(x[:CHECK_ROWS]), "max_abs_diff": float(f"{diff:.3g}")}},
            "data": {"name": training_data.name, "sha256": training_sha256,
                     **({"classes": list(training_data.classes)} if training_data.classes else {}),
                     "train": len(y),
                     "guard": len(guard_rows), "eval": evaluation,
                     "eval_is_training_data": before.results["data"]["sha256"] == training_sha256},
            **_training_fields(outcome, monitor),
            "before": _summary(before, "before/results.json"),
            "after": _summary(after, "after/results.json"),
        }
        record["seconds"] = round(time.perf_counter() - started, 3)
        results = {**after.results, "hardening": record}
        (stage / "hardening.json").write_text(dump(record))
        (stage / "results.json").write_text(dump(results))
        write_report(results, stage)
        move_into_place(stage, out, _output_order(stage))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return HardenResult(record=record, model_path=out / name, before=before, after=after,
                        network=trainable.network.eval())


def _training_fields(outcome: TrainingOutcome, monitor: Guard) -> dict:
    return {
        "epochs_run": outcome.epochs_run,
        "epochs_planned": outcome.epochs_planned,
        "updates": outcome.updates,
        "stopped_early": outcome.stopped_early,
        "curve": list(outcome.curve),
        "final": outcome.final,
        "guard": {**monitor.params, "best": monitor.best.to_dict(),
                  "checks": [check.to_dict() for check in monitor.checks], "events": monitor.events},
    }
