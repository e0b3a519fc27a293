"""Validation of a loaded results.json (schema ``auditor.results/1``).

``auditor check`` and ``auditor report`` read results files that may come
from another machine, an older version or a hand edit. Before either uses
one, :func:`validate_results` checks the top-level fields of design.md §3 and
their basic types, and raises an :class:`~auditor.errors.AuditError` with a
one-line message naming the field, e.g.
``results.json: clean_accuracy must be a number in [0, 1], got 'high'``.
It checks the fields the policy gate and the report read, down to the runs
and curves of ``attacks[]``; fields written only by newer versions (such as
``eps_50`` and ``attacks[].runs``) are checked where present. It also
refuses a file that contradicts itself, as a hand edit can: an unknown norm,
access level, attack kind or check level, a run at an ε that is not audited,
a success curve that does not end at the run's success rate, more samples
found than attacked, query statistics above their budget, and summaries
that disagree with the per-sample records (:func:`_check_agreement`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from ..access import Access
from ..attacks.base import FIXED_EPS, MIN_NORM, NORMS
from ..eps import eps_at_half, eps_key
from ..errors import AuditError, short_reason
from ..verify import eps_bound

SCHEMA = "auditor.results/1"
ACCESS_LEVELS = tuple(level.cli_name for level in sorted(Access, reverse=True))
"""``white-box``, ``soft-label``, ``hard-label``, ``none``."""
CHECK_LEVELS = ("info", "warning", "error")
KINDS = (FIXED_EPS, MIN_NORM)
MAX_RESULTS_BYTES = 2**30
"""The largest results.json read: a scan writes about 1 KB a sample."""


def read_results(path: str | Path) -> dict:
    """Load and validate a results.json; :class:`AuditError` if it is missing or bad."""
    path = Path(path)
    if not path.exists():
        raise AuditError(f"cannot read results.json: no such file: {path}")
    if not path.is_file():  # a FIFO would never end, a device never stop
        raise AuditError(f"cannot read results.json: {path} is not a regular file")
    if path.stat().st_size > MAX_RESULTS_BYTES:
        raise AuditError(f"results file {path}: larger than {MAX_RESULTS_BYTES >> 20} MiB, not a results file")
    try:
        results = json.loads(path.read_text())
        # JSON's \ud800 escapes decode to lone surrogates, which no report or terminal can encode
        json.dumps(results, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise AuditError(f"results file {path}: holds text that is not valid Unicode (a lone surrogate)") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON, too long an int
        raise AuditError(f"results file {path}: cannot read JSON ({short_reason(exc)})") from None
    return validate_results(results, str(path))


def validate_results(results: Any, source: str = "input") -> dict:
    """Return ``results`` if it is an ``auditor.results/1`` dict with the
    fields the gate and the report rely on; else raise :class:`AuditError`.

    ``source`` (for example the file's path) starts the message.
    """
    if not isinstance(results, dict) or results.get("schema") != SCHEMA:
        raise AuditError(f"{source} is not an auditor results file (expected schema {SCHEMA!r})")
    check = _Checker(results, source)
    check.field("auditor_version", _optional(_string), "a string or null")
    check.field("seed", _integer, "an integer")
    check.field("started", _string, "a string")
    check.field("seconds", _non_negative, "a number >= 0")
    check.field("model", _mapping, "a mapping")
    for field in ("path", "format", "sha256"):
        check.field(("model", field), _string, "a string")
    check.items("model.input_shape", _positive_integer, "an integer >= 1")
    check.field("model.num_classes", _positive_integer, "an integer >= 1")
    for field in ("output", "input_layout"):
        check.field(("model", field), _string, "a string", required=False)
    if check.field("model.normalisation", _mapping, "a mapping", required=False) is not None:
        for field in ("mean", "std"):
            check.items(("model", "normalisation", field), _number, "a number")
    check.field("data", _mapping, "a mapping")
    check.field("data.name", _string, "a string")
    check.field("data.sha256", _string, "a string")
    check.field("data.n", _count, "an integer >= 0")
    check.field("access", _mapping, "a mapping")
    check.choice("access.level", ACCESS_LEVELS)
    check.field("access.reason", _string, "a string")
    check.field("threat", _mapping, "a mapping")
    check.choice("threat.norm", NORMS)
    check.items("threat.eps", _non_negative, "a number >= 0")
    check.field("threat.budget", _optional(_positive_integer), "an integer >= 1 or null", required=False)
    if check.field("threat.target", _optional(_mapping), "a mapping or null", required=False) is not None:
        _check_target(check, results["model"]["num_classes"])
    check.field("clean_accuracy", _fraction, "a number in [0, 1]")
    _check_accuracies(check, ("robust_accuracy",))
    _check_robust_eps(check, results)
    check.field("eps_50", _optional(_non_negative), "a number >= 0 or null", required=False)
    for number in check.items("attacks", _mapping, "a mapping"):
        _check_attack(check, ("attacks", number), results["threat"]["eps"])
    samples = check.items("samples", _mapping, "a mapping")
    for number in samples:
        check.field(("samples", number, "distortion"), _optional(_non_negative), "a number >= 0 or null")
    if len(samples) > results["data"]["n"]:
        raise check.error(f"samples lists {len(samples)} samples, more than data.n = {results['data']['n']}")
    for number in check.items("checks", _mapping, "a mapping"):
        for field in ("id", "message"):
            check.field(("checks", number, field), _string, "a string")
        check.choice(("checks", number, "level"), CHECK_LEVELS)
    check.field("manifest", _mapping, "a mapping")
    _check_agreement(check, results)
    return results


TARGET_MODES = ("random", "least-likely", "class")


def _check_target(check: "_Checker", num_classes: int) -> None:
    """A targeted audit's ``threat.target``: its mode, and for a class its
    index (a class of the model) and the samples left out. The policy gate
    and the report both rely on it: an empty mapping read as untargeted."""
    if check.choice("threat.target.mode", TARGET_MODES) == "class":
        chosen = check.field("threat.target.class", _count, "an integer >= 0")
        if chosen >= num_classes:
            raise check.error(f"threat.target.class is {chosen}, not a class of the {num_classes}-class model")
        check.field("threat.target.left_out", _count, "an integer >= 0", required=False)


def _check_accuracies(check: "_Checker", name: tuple) -> None:
    """Field ``name`` is a mapping of ε keys to robust accuracies."""
    accuracies = check.field(name, _mapping, "a mapping of ε to numbers in [0, 1]")
    for key in accuracies:
        if not _eps_key(key):
            raise check.error(f"{_display(name)}: key {key!r} is not an ε (a number >= 0)")
        check.field((*name, key), _fraction, "a number in [0, 1]")


def _check_attack(check: "_Checker", name: tuple, audited: list[float]) -> None:
    """One ``attacks[]`` item: the fields of design.md §3, and where present
    its attacked samples, paper and runs (each run's ε, counts, query
    statistics and curves). A fixed-ε run has an ε, and every ε of a run is
    one of the ``audited`` ones (``threat.eps``)."""
    for field in ("name", "paper"):
        check.field((*name, field), _string, "a string")
    check.choice((*name, "access"), ACCESS_LEVELS)
    kind = check.choice((*name, "kind"), KINDS)
    check.choice((*name, "norm"), NORMS)
    check.field((*name, "params"), _mapping, "a mapping")
    check.field((*name, "samples"), _count, "an integer >= 0")
    check.field((*name, "success_rate"), _optional(_fraction), "a number in [0, 1] or null")
    check.field((*name, "seconds"), _non_negative, "a number >= 0")
    _check_accuracies(check, (*name, "robust_accuracy"))
    _check_queries(check, (*name, "queries"), required=True)
    if not check.has((*name, "runs")):
        return
    for number in check.items((*name, "runs"), _mapping, "a mapping"):
        run = (*name, "runs", number)
        if kind == FIXED_EPS:
            eps = check.field((*run, "eps"), _non_negative, "a number >= 0 (a fixed-ε attack's run has its ε)")
        else:
            eps = check.field((*run, "eps"), _optional(_non_negative), "a number >= 0 or null", required=False)
        if eps is not None:
            _check_audited(check, (*run, "eps"), eps, audited)
        attacked = check.field((*run, "samples"), _count, "an integer >= 0")
        broken = check.field((*run, "broken"), _count, "an integer >= 0")
        _check_spent(check, run, check.field((*name, "queries", "budget"), _optional(_positive_integer),
                                             "an integer >= 1 or null"))
        if broken > attacked:
            raise check.error(f"{_display(run)}: broken is {broken}, more than its {attacked} samples")
        if check.has((*run, "queries_to_success")):
            _check_queries(check, (*run, "queries_to_success"), required=False)
        _check_success_curve(check, (*run, "success_curve"), broken, attacked)
        distortion = _check_curve(check, (*run, "distortion_at_queries"), {
            "queries": (_count, "an integer >= 0"),
            "median": (_optional(_non_negative), "a number >= 0 or null"),
            "mean_found": (_optional(_non_negative), "a number >= 0 or null"),
            "found": (_count, "an integer >= 0"),
        })
        if distortion is not None and max(distortion["found"], default=0) > attacked:
            raise check.error(f"{_display(run)}.distortion_at_queries: found is {max(distortion['found'])}, more "
                              f"than the run's {attacked} samples")
        if check.has((*run, "success_by_eps")):
            _check_success_by_eps(check, (*run, "success_by_eps"), attacked, audited)


def _check_spent(check: "_Checker", run: tuple, budget: int | None) -> None:
    """No sample's ``per_sample.queries`` in a run exceeds the attack's budget
    (per sample, per run: the oracle refuses any query past it)."""
    if budget is None or not check.has((*run, "per_sample")) or not check.has((*run, "per_sample", "queries")):
        return
    name = (*run, "per_sample", "queries")
    for number in check.items(name, _count, "an integer >= 0"):
        spent = check.field((*name, number), _count, "an integer >= 0")
        if spent > budget:
            raise check.error(f"{_display((*name, number))} is {spent}, above its budget of {budget} queries "
                              "per sample per run")


def _check_audited(check: "_Checker", name: tuple, eps: float, audited: list[float]) -> None:
    """A run's ε (or a minimum-norm run's ``success_by_eps`` entry's) is one of ``threat.eps``."""
    if eps_key(eps) not in {eps_key(value) for value in audited}:
        raise check.error(f"{_display(name)} is {_show(eps)}, not one of threat.eps {_show(audited)}")


def _check_success_curve(check: "_Checker", name: tuple, broken: int, attacked: int) -> None:
    """A success curve, if present: success rate against queries, whose last
    point is the run's (or the ε's) ``broken`` of the ``attacked`` samples:
    the last checkpoint is the budget (or the most queries spent), by which
    every sample broken was. Rates are rounded to 6 decimals."""
    curve = _check_curve(check, name, {
        "queries": (_count, "an integer >= 0"),
        "success_rate": (_optional(_fraction), "a number in [0, 1] or null"),
    })
    if curve is None or not attacked:
        return
    rates = curve["success_rate"]
    if rates and rates[-1] is not None and abs(rates[-1] - broken / attacked) > 1e-6:
        raise check.error(f"{_display(name)} ends at a success rate of {_show(rates[-1])}, but {broken} of "
                          f"{attacked} samples broken is {broken / attacked:.6g}")


def _check_success_by_eps(check: "_Checker", name: tuple, attacked: int, audited: list[float]) -> None:
    """A minimum-norm run's query cost per ε: each entry's ε (an audited
    one), samples broken (at most the run's ``attacked``), query statistics
    and success curve."""
    for number in check.items(name, _mapping, "a mapping"):
        entry = (*name, number)
        _check_audited(check, (*entry, "eps"), check.field((*entry, "eps"), _non_negative, "a number >= 0"), audited)
        broken = check.field((*entry, "broken"), _count, "an integer >= 0")
        if broken > attacked:
            raise check.error(f"{_display(entry)}: broken is more than the run's {attacked} samples")
        _check_queries(check, (*entry, "queries_to_success"), required=True)
        check.field((*entry, "success_curve"), _mapping, "a mapping")
        _check_success_curve(check, (*entry, "success_curve"), broken, attacked)


def _check_queries(check: "_Checker", name: tuple, required: bool) -> None:
    """Query statistics: mean, median, p90 and max (null when nothing was
    broken) and the budget (null: unlimited), none of them above it. The
    budget is per sample and per run, and the oracle refuses a query past
    it, so no sample's count can exceed it (``total``, summed over the
    samples, can)."""
    check.field(name, _mapping, "a mapping")
    stats = {field: check.field((*name, field), _optional(_non_negative), "a number >= 0 or null", required=required)
             for field in ("mean", "median", "p90", "max")}
    budget = check.field((*name, "budget"), _optional(_positive_integer), "an integer >= 1 or null", required=required)
    check.field((*name, "total"), _count, "an integer >= 0", required=False)
    for field, value in stats.items():
        if budget is not None and value is not None and value > budget:
            raise check.error(f"{_display((*name, field))} is {_show(value)}, above its budget of {budget} queries "
                              f"per sample per run")


def _check_curve(check: "_Checker", name: tuple, columns: dict[str, tuple[Callable, str]]) -> dict | None:
    """A curve, if present: a mapping of equally long lists, one per column
    of ``columns`` (column: (valid, expected)), each item valid. Returns
    the curve (None when absent)."""
    if not check.has(name):
        return None
    curve = check.field(name, _mapping, "a mapping")
    lengths = {column: len(check.items((*name, column), valid, expected))
               for column, (valid, expected) in columns.items()}
    if len(set(lengths.values())) > 1:
        raise check.error(f"{_display(name)}: its lists differ in length "
                          f"({', '.join(f'{column} {length}' for column, length in lengths.items())})")
    return curve


def _check_agreement(check: "_Checker", results: dict) -> None:
    """Refuse summaries that contradict what they summarise: robust
    accuracy and the per-sample distortions where all samples are listed
    (robust at ε: none, or above ε's verification bound; the
    distortions are rounded to 6 decimals, so a bound ± 1e-6 is allowed),
    eps_50 and the median of those distortions, and a policy verdict and its
    requirements."""
    exact = {eps_key(eps): eps for eps in results["threat"]["eps"]}  # the keys are rounded
    sizes = [sample["distortion"] for sample in results["samples"]]
    whole = sizes and len(sizes) == results["data"]["n"]  # a file listing every sample
    _check_worst_case(check, results)
    if whole:
        _check_clean_accuracy(check, results)
    for key, value in results["robust_accuracy"].items() if whole else ():
        bound = eps_bound(exact[key])
        surely = sum(size is None or size > bound + 1e-6 for size in sizes) / len(sizes)
        maybe = sum(size is None or size > bound - 1e-6 for size in sizes) / len(sizes)
        if not surely - 1e-6 <= value <= maybe + 1e-6:
            raise check.error(f"robust_accuracy {key} is {value}, but the samples' distortions give {surely:.6g}")
    if whole and "eps_50" in results:
        _check_eps_50(check, results["eps_50"], sizes)
    policy = results.get("policy")
    if policy is None:
        return
    check.field("policy", _mapping, "a mapping or null")
    passed = check.field("policy.passed", _boolean, "true or false")
    verdicts = [check.field(("policy", "requirements", number, "passed"), _boolean, "true or false")
                for number in check.items("policy.requirements", _mapping, "a mapping")]
    if passed != all(verdicts):
        raise check.error(f"policy.passed is {str(passed).lower()}, but {verdicts.count(False)} of "
                          f"{len(verdicts)} requirements failed")


def _check_robust_eps(check: "_Checker", results: dict) -> None:
    """robust_accuracy has one key per ε of threat.eps (checked before the
    attacks, whose runs' ε must be among them too)."""
    listed = sorted({eps_key(eps) for eps in results["threat"]["eps"]})
    if sorted(results["robust_accuracy"]) != listed:
        raise check.error(f"robust_accuracy has ε {_show(sorted(results['robust_accuracy']))} but threat.eps is {_show(listed)}")


def _check_worst_case(check: "_Checker", results: dict) -> None:
    """Robust accuracy is the per-sample worst case over the attacks, so at
    each ε it is at most every attack's cumulative figure there (robust
    accuracy after that attack and those before it)."""
    for number, attack in enumerate(results["attacks"]):
        for key, own in attack["robust_accuracy"].items():
            overall = results["robust_accuracy"].get(key)
            if own is not None and overall is not None and overall > own + 1e-6:
                raise check.error(f"robust_accuracy {key} is {overall}, above attacks[{number}] "
                                  f"({attack['name']})'s {own}: it is their worst case")


def _check_clean_accuracy(check: "_Checker", results: dict) -> None:
    """clean_accuracy is the share of the listed samples whose clean
    prediction is their label."""
    samples = results["samples"]
    for number in range(len(samples)):
        check.field(("samples", number, "label"), _count, "an integer >= 0")
        check.field(("samples", number, "clean_pred"), _integer, "an integer")
    share = sum(sample["clean_pred"] == sample["label"] for sample in samples) / len(samples)
    if abs(results["clean_accuracy"] - share) > 1e-6:
        raise check.error(f"clean_accuracy is {results['clean_accuracy']}, but the samples' clean "
                          f"predictions give {share:.6g}")


def _check_eps_50(check: "_Checker", eps_50: float | None, sizes: list) -> None:
    """eps_50 is :func:`~auditor.eps.eps_at_half` of the per-sample distortions."""
    expected = eps_at_half(sizes)
    if (eps_50 is None) != (expected is None) or (expected is not None and abs(eps_50 - expected) > 1e-6):
        raise check.error(f"eps_50 is {_show(eps_50)}, but the samples' distortions give {_show(expected)}")


class _Checker:
    """Checks fields by name, ``"threat.eps"`` or ``("attacks", 0, "queries")``,
    and raises one-line errors that name them."""

    def __init__(self, results: dict, source: str):
        self.results = results
        self.source = source

    def error(self, problem: str) -> AuditError:
        return AuditError(f"{self.source}: {problem}")

    def field(self, name: str | tuple, valid: Callable[[Any], bool], expected: str, required: bool = True) -> Any:
        """The value of field ``name``, if present and ``valid`` accepts it;
        None for a missing field that is not ``required``."""
        parts = tuple(name.split(".")) if isinstance(name, str) else name
        value: Any = self.results
        for depth, part in enumerate(parts):
            if isinstance(part, str) and part not in value:
                if not required and depth == len(parts) - 1:
                    return None
                raise self.error(f"missing required field '{_display(parts[: depth + 1])}'")
            value = value[part]
        if not valid(value):
            raise self.error(f"{_display(parts)} must be {expected}, got {_show(value)}")
        return value

    def choice(self, name: str | tuple, choices: tuple[str, ...]) -> str:
        """The value of field ``name``, a string among ``choices``."""
        value = self.field(name, _string, "a string")
        if value not in choices:
            parts = tuple(name.split(".")) if isinstance(name, str) else name
            raise self.error(f"{_display(parts)} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def has(self, name: tuple) -> bool:
        """Whether field ``name`` is present; its parents must have been checked."""
        value: Any = self.results
        for part in name[:-1]:
            value = value[part]
        return name[-1] in value

    def items(self, name: str | tuple, valid: Callable[[Any], bool], expected: str) -> range:
        """Check that field ``name`` is a list whose items ``valid`` accepts; their indices."""
        values = self.field(name, _list, "a list")
        parts = tuple(name.split(".")) if isinstance(name, str) else name
        for number in range(len(values)):
            self.field((*parts, number), valid, expected)
        return range(len(values))


def _display(parts: tuple) -> str:
    """``("attacks", 0, "queries")`` as ``attacks[0].queries``; an ε key as ``robust_accuracy['0.1']``."""
    text = str(parts[0])
    for part in parts[1:]:
        if isinstance(part, int):
            text += f"[{part}]"
        elif "." in part:
            text += f"[{part!r}]"
        else:
            text += f".{part}"
    return text


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to one short line."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any) -> bool:
    """A finite int or float; JSON true/false are not numbers here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fraction(value: Any) -> bool:
    return _number(value) and 0 <= value <= 1


def _non_negative(value: Any) -> bool:
    return _number(value) and value >= 0


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return _integer(value) and value >= 0


def _positive_integer(value: Any) -> bool:
    return _integer(value) and value >= 1


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _string(value: Any) -> bool:
    return isinstance(value, str)


def _mapping(value: Any) -> bool:
    return isinstance(value, dict)


def _optional(valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or valid(value)


def _list(value: Any) -> bool:
    return isinstance(value, list)


def _eps_key(key: str) -> bool:
    """A ``robust_accuracy`` key: an ε written as a number (``"0.1"``, ``"0.0313725"``)."""
    try:
        return _non_negative(float(key))
    except ValueError:
        return False
