"""results.json (schema ``auditor.results/1``): the single source of truth.

The report and the policy gate read only this dict, so ``auditor report`` and
``auditor check`` work on a results file from another machine. Fields that
CI relies on are never removed; ``docs/results.md`` documents each. Infinite
distortion ("no adversarial example found") is written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from .attacks.base import FIXED_EPS
from .attacks.transfer import TransferAttack
from .battery import AttackReport, BatteryOutcome, RunReport
from .eps import eps_key

TIMING_FIELDS = ("started", "seconds")
"""Top-level fields that differ between two runs with the same seed
(plus ``attacks[].seconds``)."""


def _accuracy_dict(values: dict[float, float]) -> dict[str, float]:
    return {eps_key(eps): round(value, 6) for eps, value in sorted(values.items())}


def _stats(values: Sequence[int], budget: int | None, total: int, measure: str) -> dict:
    if len(values) == 0:
        summary = {"mean": None, "median": None, "p90": None, "max": None}
    else:
        array = np.asarray(values, dtype=np.float64)
        summary = {
            "mean": round(float(array.mean()), 3),
            "median": round(float(np.median(array)), 3),
            "p90": round(float(np.percentile(array, 90)), 3),
            "max": int(array.max()),
        }
    return {**summary, "budget": budget, "total": int(total), "measure": measure}


CURVE_QUERIES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
"""Query checkpoints of the success-vs-queries curves (cut at the budget, which is added)."""


def success_curve(queries: Sequence[int], success: Sequence[bool], budget: int | None) -> dict:
    """Success rate against queries: at each checkpoint q, the fraction of the
    run's samples broken with at most q queries."""
    spent = np.asarray(queries, dtype=np.int64)
    broken = np.asarray(success, dtype=bool)
    limit = budget if budget is not None else int(spent.max(initial=0))
    points = [q for q in CURVE_QUERIES if q < limit] + [limit]
    rates = [round(float((broken & (spent <= q)).mean()), 6) if len(spent) else None for q in points]
    return {"queries": points, "success_rate": rates}


def _to_success(queries: Sequence[int], success: Sequence[bool], budget: int | None, total: int,
                measure: str) -> dict:
    """Query statistics over the samples broken (``success``), from each one's ``queries``."""
    return _stats([q for q, ok in zip(queries, success) if ok], budget, total, measure)


def _run_entry(run: RunReport, budget: int | None, indices: Sequence[int], measure: str) -> dict:
    entry = {
        "eps": run.eps, "samples": run.samples, "broken": run.broken, "queries": run.queries_total,
        "queries_to_success": _to_success(run.reached or run.queries, run.success, budget, run.queries_total,
                                          measure),
        "per_sample": {
            "index": [int(indices[position]) for position in run.positions],
            "queries": list(run.queries),
            "success": list(run.success),
        },
    }
    if run.reached:
        entry["per_sample"]["reached"] = list(run.reached)
    if run.surrogate is not None:
        entry["surrogate"] = run.surrogate
    if run.start_index:
        entry["per_sample"]["start_index"] = [None if i < 0 else int(i) for i in run.start_index]
    if run.eps is not None:
        entry["success_curve"] = success_curve(run.queries, run.success, budget)
    if run.reached_at:
        entry["success_by_eps"] = [_success_at(eps, queries, success, budget, run.queries_total)
                                   for eps, queries, success in run.reached_at]
    if run.distortion_at:
        entry["distortion_at_queries"] = distortion_checkpoints(run.distortion_at)
    return entry


def _success_at(eps: float, queries: Sequence[int], success: Sequence[bool], budget: int | None,
                total: int) -> dict:
    """A minimum-norm run's query cost at one ε: its samples broken within ε,
    their queries to success (read from the trace) and the success curve."""
    return {
        "eps": eps, "broken": sum(success),
        "queries_to_success": _to_success(queries, success, budget, total, "to-success"),
        "success_curve": success_curve(queries, success, budget),
    }


def _finite_or_none(value: float) -> float | None:
    return None if not math.isfinite(value) else round(value, 6)


def distortion_checkpoints(points) -> dict:
    """Median and mean of the attack's best distortion at each query checkpoint,
    and each sample's own (its trace at the checkpoints).

    Samples with no adversarial example yet count as infinitely far: the
    median is null until more than half of them have one; the mean is over those
    found, with the count found alongside; a sample's own value is null."""
    queries, medians, means, found = [], [], [], []
    per_sample = [[_finite_or_none(size) for size in sizes] for sizes in zip(*(sizes for _, sizes in points))]
    for checkpoint, sizes in points:
        values = np.asarray(sizes, dtype=np.float64)
        finite = values[np.isfinite(values)]
        queries.append(int(checkpoint))
        medians.append(_finite_or_none(float(np.median(values))) if len(values) else None)
        means.append(_finite_or_none(float(finite.mean())) if len(finite) else None)
        found.append(int(len(finite)))
    return {"queries": queries, "median": medians, "mean_found": means, "found": found, "per_sample": per_sample}


def attack_entry(report: AttackReport, indices: Sequence[int]) -> dict:
    """One ``attacks[]`` item; ``indices`` maps batch positions to data set indices.

    Query statistics are over the samples the attack broke: queries to
    success (``measure: to-success``). A minimum-norm attack refines until
    its budget is used; its queries to success are those it had spent when
    its best example first came within the largest ε, read from its trace
    (``per_sample.reached``), and the queries spent (``measure: spent``)
    where it has no trace in the threat norm. Each run (one ε) also lists,
    per sample, the queries it spent and whether it broke the sample, and,
    for fixed-ε attacks, the success rate against queries at fixed checkpoints.
    """
    attack = report.attack
    timed = attack.kind == FIXED_EPS or (bool(report.runs) and all(run.reached for run in report.runs))
    measure = "to-success" if timed else "spent"
    total = sum(run.queries_total for run in report.runs)
    return {
        "name": attack.label,
        "access": attack.access.cli_name,
        "kind": attack.kind,
        "norm": attack.norm,
        "params": attack.params(),
        "paper": attack.paper,
        "samples": report.samples,
        "robust_accuracy": _accuracy_dict(report.robust_accuracy),
        "success_rate": round(report.broken / report.samples, 6) if report.samples else None,
        "queries": _stats(report.queries_to_success, report.budget, total, measure),
        "runs": [_run_entry(run, report.budget, indices, measure) for run in report.runs],
        "seconds": round(report.seconds, 3),
    }


def transfer_entry(surrogates, sets, reports: Sequence[AttackReport], eps_list) -> dict | None:
    """The transfer matrix, or None when the scan had no surrogates.

    ``matrix[ε][method][set]`` is the success rate on the target of the
    method run on that surrogate set, over the samples robust at ε when the
    transfer attacks started (``samples[ε]``, the same for every cell).
    ``baseline`` is plain I-FGSM, the method the others are compared with.
    Each surrogate is listed with the sha256 of its weights (a file's as the
    model loader computes it), which does not depend on whether a trained
    one was read from the cache.
    Two runs for one cell (two sets of one name) are an internal error, never
    one overwriting the other.
    """
    if not surrogates:
        return None
    matrix: dict[str, dict[str, dict[str, float]]] = {eps_key(eps): {} for eps in sorted(eps_list)}
    samples: dict[str, int] = {}
    baseline = None
    for report in reports:
        attack = report.attack
        if not isinstance(attack, TransferAttack):
            continue
        if not attack.transforms:
            baseline = attack.label
        for run in report.runs:
            key = eps_key(run.eps)
            samples[key] = run.samples
            row = matrix[key].setdefault(attack.label, {})
            if run.surrogate in row:
                raise ValueError(f"two runs of {attack.label} on surrogate set {run.surrogate!r} at {key}")
            row[run.surrogate] = round(run.broken / run.samples, 6)
    return {
        "surrogates": [
            {"name": s.name, "source": s.source, "sha256": s.sha256,
             "clean_accuracy": None if s.clean_accuracy is None else round(s.clean_accuracy, 6)}
            for s in surrogates
        ],
        "sets": [group.name for group in sets],
        "baseline": baseline,
        "samples": samples,
        "matrix": matrix,
    }


def sample_entries(indices: Sequence[int], labels, outcome: BatteryOutcome, targets=None) -> list[dict]:
    """Per-sample records; ``target`` is the class a targeted audit aimed for (else null)."""
    records = outcome.records
    goals = [None] * len(indices) if targets is None else targets.tolist()
    return [
        {
            "index": int(index),
            "label": int(label),
            "target": goal,
            "clean_pred": int(pred),
            "distortion": None if math.isinf(dist) else round(float(dist), 6),
            "broken_by": broken_by,
            "queries": int(queries),
        }
        for index, label, goal, pred, dist, broken_by, queries in zip(
            indices,
            labels.tolist(),
            goals,
            outcome.clean_pred.tolist(),
            records.distortion.tolist(),
            records.broken_by.tolist(),
            records.queries.tolist(),
        )
    ]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def auditor_version() -> str | None:
    return _version("auditor")


def manifest(command: str, device: str) -> dict:
    """What ran the scan. ``onnxruntime`` is the version of the module imported:
    the distributions ``onnxruntime`` and ``onnxruntime-gpu`` both ship it, and
    when both are installed the files of either may be the ones loaded, so the
    installed distributions and the execution providers the module offers are
    recorded beside it (each a comma-separated string, as the report shows it)."""
    import onnxruntime

    distributions = {name: _version(name) for name in ("onnxruntime", "onnxruntime-gpu")}
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_distributions": ", ".join(
            f"{name} {version}" for name, version in distributions.items() if version is not None
        ),
        "onnxruntime_providers": ", ".join(onnxruntime.get_available_providers()),
        "platform": platform.platform(),
        "command": command,
        "device": device,
    }


def dump(results: dict) -> str:
    return json.dumps(results, indent=2, allow_nan=False) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
