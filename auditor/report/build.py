"""Turn a results dict (``auditor.results/1``) into the view a report renders.

The report is built from ``results.json`` alone, so a results file written on
another machine renders the same report. Everything the templates show is
formatted here (percentages, query counts, hashes) and the templates only lay
it out. Each report section has its own field on :class:`ReportView`; a new
section is a new field here plus a new partial template.
"""

from __future__ import annotations

import io
import math
import re
import statistics
import textwrap
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal

import matplotlib
import matplotlib.style
from markupsafe import Markup
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, PercentFormatter

from ..attacks.base import FIXED_EPS
from ..eps import eps_text
from ..errors import AuditError, short_reason
from ..resources import docs_dir
from ..verify import eps_bound
from .formatting import MISSING, exact_percent, interval_text, percent, percent_beside
from .schema import validate_results
from .transfer import TransferView, transfer_view

CHECKS_DOC = "checks.md"
"""The explanation of every check id, in the shipped docs (``docs/checks.md``)."""

_NORM_NAMES = {"linf": "L∞", "l2": "L2", "l1": "L1", "l0": "L0"}
_VERDICTS = {"pass": "PASS", "fail": "FAIL", "none": "NOT GATED"}
OVERSTATING_CHECKS = frozenset({
    "randomised-model", "small-budget", "transfer-only", "custom-battery", "nan-gradients", "no-gradient-attack",
    "no-target-image", "training-data-audited", "softmax-outputs", "zero-gradients", "unbounded-attack-fails",
    "saturated-scores", "piecewise-constant",
})
"""Check ids whose paragraph in ``docs/checks.md`` says the robust accuracy is
overstated, may be, or (``nan-gradients``) cannot be trusted: raised, they
mark the cover's robust accuracy (:data:`SURROGATE_CHECKS` too, where only
transfer attacks ran; see :func:`_overstating`)."""
SURROGATE_CHECKS = frozenset({"weak-surrogate", "surrogate-zero-gradients"})
"""Check ids on a surrogate whose paragraph says the robust accuracy may be
overstated where transfer attacks were all that ran."""
# Fixed chart settings: with the same matplotlib, the same results give a byte-identical SVG.
_CHART_RC = {"svg.hashsalt": "auditor-report", "svg.fonttype": "path", "font.size": 9}


@dataclass(frozen=True)
class Field:
    """One labelled value of a key-value table; ``mono`` for hashes, paths and commands."""

    label: str
    value: str
    mono: bool = False


@dataclass(frozen=True)
class Headline:
    """A headline number on the verdict page, with its notes (a line each);
    ``flag`` warns that it is not to be taken at face value."""

    label: str
    value: str
    notes: tuple[str, ...]
    flag: str = ""


@dataclass(frozen=True)
class Verdict:
    """The outcome of the audit: PASS / FAIL under a policy, or NOT GATED without one."""

    status: str  # "pass", "fail" or "none"
    text: str
    summary: str
    detail: str
    policy: str | None
    caveat: str
    """What the checks above info level say about the verdict ("" when none was raised)."""


@dataclass(frozen=True)
class RobustRow:
    """Robust accuracy at one ε over all attacks."""

    eps: str
    robust_accuracy: str
    broken: str
    interval: str
    """The 95 % Wilson score interval for the ``n`` samples."""


@dataclass(frozen=True)
class AttackRow:
    """One attack of the cascade, in run order."""

    name: str
    access: str
    kind: str
    norm: str
    samples: str
    success_rate: str
    success_eps: str
    """The ε the success rate is at: the largest the attack ran at (for a
    minimum-norm attack, the largest audited ε), with the threat norm's name
    ("0.3 L∞") for an attack in the other norm."""
    queries_mean: str
    queries_median: str
    queries_p90: str
    queries_max: str
    budget: str
    seconds: str
    paper: str
    params: str


@dataclass(frozen=True)
class QueryRow:
    """Query cost of one black-box attack at one ε (a fixed-ε run, or a minimum-norm run read at that ε)."""

    name: str
    eps: str
    samples: str
    success_rate: str
    mean: str
    median: str
    p90: str
    budget: str


@dataclass(frozen=True)
class DistortionRow:
    """A minimum-norm attack's distortion after a number of queries per sample."""

    name: str
    norm: str
    queries: str
    median: str
    mean_found: str
    found: str


@dataclass(frozen=True)
class CheckRow:
    """A sanity check raised during the scan."""

    id: str
    level: str
    message: str


@dataclass(frozen=True)
class CheckNote:
    """What a check raised in the scan means, from its paragraph in ``docs/checks.md``."""

    id: str
    paragraphs: tuple[str, ...]


@dataclass(frozen=True)
class RequirementRow:
    """One requirement of the applied policy."""

    id: str
    description: str
    passed: bool
    actual: str
    """The recorded value as the report shows it: accuracies as percentages."""


@dataclass(frozen=True)
class PolicyView:
    """The applied policy and its requirements."""

    name: str
    description: str | None
    passed: bool
    requirements: tuple[RequirementRow, ...]


@dataclass(frozen=True)
class DistortionSummary:
    """Smallest verified adversarial distortions over the evaluated samples,
    split at the largest audited ε.

    ``broken``, ``beyond``, ``clean_errors`` and ``not_broken`` are counts of
    samples as phrases (``"1 sample"``, ``"40 samples"``).
    """

    norm: str
    largest_eps: str
    broken: str
    """Samples an attack broke within the largest audited ε: broken under the threat model."""
    median: str
    mean: str
    beyond: str
    """Samples whose only adversarial examples, found by minimum-norm attacks,
    lie beyond the largest audited ε: robust under the threat model ("" when none)."""
    beyond_median: str
    clean_errors: str
    not_broken: str
    eps_50: str
    """A sentence on the ε where robust accuracy falls to 50 % ("" for results without ``eps_50``)."""


@dataclass(frozen=True)
class ComparisonRow:
    """One metric of the hardened model against the original."""

    metric: str
    before: str
    after: str
    change: str


@dataclass(frozen=True)
class CurveRow:
    """One epoch of hardening: the schedules, the training loss and the guard batch's accuracies."""

    epoch: str
    eps: str
    radius: str
    """The training radius: ``eps`` times the method's ``eps_scale``."""
    lr: str
    loss: str
    train_accuracy: str
    clean: str
    fgsm: str
    pgd: str


@dataclass(frozen=True)
class HardeningView:
    """The "Hardening" section: what training did and what it changed."""

    method: str
    paper: str
    summary: str
    settings: tuple[Field, ...]
    comparison: tuple[ComparisonRow, ...]
    curve: tuple[CurveRow, ...]
    radius_scale: str
    """The training radius as a multiple of ε ("1.2")."""
    curve_note: str
    """How to read the schedules: values at the end of each epoch, the cyclic learning rate, the radius."""
    chart_svg: Markup | None
    guard: str
    events: tuple[str, ...]
    output: tuple[Field, ...]


@dataclass(frozen=True)
class ReportView:
    """Everything the report templates show, one field per section."""

    title: str
    model_name: str
    date: str
    stamp: str
    """The auditor version and the scan date, for every page's footer."""
    verdict: Verdict
    headlines: tuple[Headline, ...]
    cover_checks: tuple[CheckRow, ...]
    """The checks above info level, errors first, for the cover."""
    robust_definition: str
    model: tuple[Field, ...]
    data: tuple[Field, ...]
    threat: tuple[Field, ...]
    clean_row: RobustRow
    """Clean accuracy as a row of the robust accuracy table (ε = 0)."""
    robust_rows: tuple[RobustRow, ...]
    chart_svg: Markup | None
    distortion: DistortionSummary
    attacks: tuple[AttackRow, ...]
    query_rows: tuple[QueryRow, ...]
    query_chart_svg: Markup | None
    query_note: str
    """Where the cost of the minimum-norm black-box attacks is shown instead ("" when none ran)."""
    distortion_rows: tuple[DistortionRow, ...]
    distortion_chart_svg: Markup | None
    checks: tuple[CheckRow, ...]
    check_notes: tuple[CheckNote, ...]
    policy: PolicyView | None
    manifest: tuple[Field, ...]
    hardening: HardeningView | None = None
    transfer: TransferView | None = None


def build_view(results: dict, source: str = "input") -> ReportView:
    """Build the report view of a results dict.

    ``source`` names the results (for example its file name) in error messages.
    Raises :class:`AuditError` when ``results`` is not an ``auditor.results/1``
    dict (see :func:`~auditor.report.schema.validate_results`), lacks a
    field the report needs, or has one the checks there do not cover but the
    report cannot read (a hand edit of the ``transfer`` or ``hardening``
    record, say).
    """
    validate_results(results, source)
    try:
        return _build(results)
    except KeyError as missing:
        raise AuditError(f"{source} is not a complete auditor results file: missing {missing}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise AuditError(f"{source} is a malformed auditor results file: {short_reason(error)}") from None


def _build(results: dict) -> ReportView:
    policy = _policy(results.get("policy"))
    checks = tuple(CheckRow(check["id"], check["level"], check["message"]) for check in results["checks"])
    n = results["data"]["n"]
    return ReportView(
        title="Model robustness audit",
        model_name=results["model"]["path"],
        date=_date(results["started"]),
        stamp=f"auditor {results['auditor_version'] or '(version unknown)'} · scan of {_date(results['started'])}",
        verdict=_verdict(results, policy),
        headlines=_headlines(results),
        cover_checks=tuple(sorted((check for check in checks if check.level != "info"),
                                  key=lambda check: check.level != "error")),
        robust_definition=_robust_definition(results),
        model=_model_fields(results["model"]),
        data=_data_fields(results),
        threat=_threat_fields(results),
        clean_row=_robust_row("0 (clean)", results["clean_accuracy"], n),
        robust_rows=tuple(_robust_row(eps_text(eps), results["robust_accuracy"][eps], n)
                          for eps in _sorted_eps(results["robust_accuracy"])),
        chart_svg=_chart(results),
        distortion=_distortion(results),
        attacks=tuple(_attack_row(attack, results["threat"]) for attack in results["attacks"]),
        query_rows=tuple(_query_row(attack, run) for attack, run in _query_runs(results)),
        query_chart_svg=_query_chart(results),
        query_note=_query_note(results),
        distortion_rows=_distortion_rows(results),
        distortion_chart_svg=_distortion_chart(results),
        checks=checks,
        check_notes=_check_notes(results["checks"]),
        policy=policy,
        manifest=_manifest_fields(results),
        hardening=_hardening(results.get("hardening")),
        transfer=transfer_view(results),
    )


def norm_name(norm: str) -> str:
    """Display name of a threat norm (``"linf"`` -> ``"L∞"``)."""
    return _NORM_NAMES.get(norm, norm)


def _count(value: float | None) -> str:
    """A query count or statistic: whole numbers as they are, others
    (means, medians between two counts, percentiles) to one decimal."""
    if value is None:
        return MISSING
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def _param(value) -> str:
    """An attack parameter as written in the report: floats to 4 significant
    digits, None (the attack works the value out itself) as "auto", lists in
    brackets and mappings as ``name(key=value, ...)`` when they have a name."""
    if value is None:
        return "auto"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(_param(item) for item in value)}]"
    if isinstance(value, dict):
        settings = _params({key: item for key, item in value.items() if key != "name"})
        return f"{value['name']}({settings})" if "name" in value else f"({settings})"
    return str(value)


def _params(params: dict) -> str:
    """Settings as ``key=value, ...``, each value as :func:`_param` writes it."""
    return ", ".join(f"{key}={_param(value)}" for key, value in params.items())


def _budget(budget: int | None) -> str:
    return "unlimited" if budget is None else f"{budget:,}"


def _date(started: str) -> str:
    try:
        return datetime.fromisoformat(started).isoformat(sep=" ", timespec="minutes")
    except ValueError:
        return started


def _sorted_eps(accuracies: dict[str, float]) -> list[str]:
    return sorted(accuracies, key=float)


def _worst_case(results: dict) -> tuple[str, float] | None:
    """The largest ε and the robust accuracy there, or None when no attack ran."""
    accuracies = results["robust_accuracy"]
    if not accuracies:
        return None
    eps = _sorted_eps(accuracies)[-1]
    return eps, accuracies[eps]


def _access_text(level: str) -> str:
    """An access level as prose names it: ``none`` is no access to the model at all."""
    return "none (no model access: transfer attacks only)" if level == "none" else level


def _battery_text(results: dict) -> str:
    """The attacks robust accuracy is the worst case over, in words
    ("targeted hard-label attacks chosen with --attacks")."""
    mode = "targeted " if results["threat"].get("target") else ""
    chosen = " chosen with --attacks" if _raised(results, {"custom-battery"}) else ""
    if results["access"]["level"] == "none":
        return f"{mode}transfer attacks only{chosen} (no model access)"
    return f"{mode}{results['access']['level']} attacks{chosen}"


def _raised(results: dict, ids: Collection[str]) -> list[str]:
    """The ids among ``ids`` of the checks raised, in order of first appearance."""
    return list(dict.fromkeys(check["id"] for check in results["checks"] if check["id"] in ids))


def _verdict(results: dict, policy: PolicyView | None) -> Verdict:
    clean = percent(results["clean_accuracy"])
    worst = _worst_case(results)
    if worst is None:
        summary = (f"No attacks were run at access level {_access_text(results['access']['level'])}; "
                   f"clean accuracy {clean}.")
    else:
        eps, accuracy = worst
        summary = (
            f"Robust accuracy {percent(accuracy)} at ε={eps_text(eps)} ({norm_name(results['threat']['norm'])}) "
            f"against {_battery_text(results)}; clean accuracy {clean}."
        )
    caveat = _caveat(results)
    if policy is None:
        detail = "No policy was applied: the results are informational."
        return Verdict("none", _VERDICTS["none"], summary, detail, None, caveat)
    failed = sum(not requirement.passed for requirement in policy.requirements)
    total = len(policy.requirements)
    status = "pass" if policy.passed else "fail"
    detail = f"Policy “{policy.name}”: {total - failed} of {total} requirements met."
    return Verdict(status, _VERDICTS[status], summary, detail, policy.name, caveat)


def _overstating(results: dict) -> list[str]:
    """The raised checks that say the cover's robust accuracy may be
    overstated: none when there is no robust accuracy or it is 0 already; a
    weak surrogate or one with zero gradients only where transfer attacks
    were all that ran, softmax outputs only where gradient attacks ran on
    them (new scans raise it at white-box access only; older results carry it
    at every level, and a soft-label attacker sees those probabilities by
    definition)."""
    worst = _worst_case(results)
    if worst is None or worst[1] == 0:
        return []
    level = results["access"]["level"]
    ids = (OVERSTATING_CHECKS - ({"softmax-outputs"} if level != "white-box" else set())
           | (SURROGATE_CHECKS if level == "none" else set()))
    return _raised(results, ids)


def _caveat(results: dict) -> str:
    """The sentence on the checks above info level, for the verdict box."""
    serious = [check for check in results["checks"] if check["level"] != "info"]
    if not serious:
        return ""
    overstating = _overstating(results)
    listed = f"{_plural(len(serious), 'check')} above info level, listed below"
    if overstating:
        return f"Robust accuracy may be overstated ({', '.join(overstating)}): read the {listed}."
    return f"Read the {listed}, before relying on this verdict."


def _target_mode(target: dict) -> str:
    """A targeted audit's mode, short: ``random``, ``least-likely`` or ``class 3``."""
    return f"class {target['class']}" if target["mode"] == "class" else target["mode"]


def _headlines(results: dict) -> tuple[Headline, ...]:
    worst = _worst_case(results)
    norm = norm_name(results["threat"]["norm"])
    n = results["data"]["n"]
    if worst is None:
        robust = Headline("Robust accuracy", MISSING, ("no attacks were run",))
    else:
        target = results["threat"].get("target")
        notes = (f"at ε={eps_text(worst[0])} ({norm})", f"targeted ({_target_mode(target)})" if target else "",
                 _confidence(worst[1], n))
        flag = "may be overstated — see the checks below" if _overstating(results) else ""
        robust = Headline("Robust accuracy", percent(worst[1]), tuple(note for note in notes if note), flag)
    checks = results["checks"]
    serious = sum(check["level"] != "info" for check in checks)
    clean = (_plural(n, "sample"), _confidence(results["clean_accuracy"], n))
    attacks = _plural(len(results["attacks"]), "attack") + " run"
    level = results["access"]["level"]
    return (
        Headline("Clean accuracy", percent(results["clean_accuracy"]), tuple(note for note in clean if note)),
        robust,
        Headline("Attacker access", level,
                 ("no model access", f"{attacks}, all transfer" if results["attacks"] else attacks)
                 if level == "none" else (attacks,)),
        Headline("Checks", str(len(checks)), (f"{serious} above info level",)),
    )


def _confidence(accuracy: float, n: int) -> str:
    """``"95 % CI 83.4–98.7 %"`` for an accuracy on ``n`` samples ("" when ``n`` is 0)."""
    interval = interval_text(accuracy, n)
    return f"95 % CI {interval}" if interval else ""


def _robust_definition(results: dict) -> str:
    """What the cover's robust accuracy means, for this audit."""
    target = results["threat"].get("target")
    definition = (
        f"Robust accuracy at ε is the share of {_all_samples(results['data']['n'])} that the "
        "model classifies correctly and that no attack of the battery broke within ε: the per-sample worst case "
        "over the battery, every adversarial example re-verified on the real runtime before it counts."
    )
    if target:
        definition += (
            f" This audit is targeted: {target_text(target).removeprefix('targeted: ')}. An attack breaks a "
            "sample only when the model outputs the sample's target class; a sample misclassified before any "
            "attack counts as broken."
        )
    return definition + (" It is an upper bound on true robustness, not a proof of it: a stronger attacker may "
                         "do better.")


def _all_samples(n: int) -> str:
    """``"all 40 audited samples"``; ``"the 1 audited sample"``."""
    return "the 1 audited sample" if n == 1 else f"all {_plural(n, 'audited sample')}"


def _model_fields(model: dict) -> tuple[Field, ...]:
    """The model file and how it was audited: the ONNX output, the input
    layout and the normalisation folded into it, where results.json records them."""
    return (
        Field("Path", model["path"], mono=True),
        Field("Format", model["format"]),
        Field("Input shape", " × ".join(str(size) for size in model["input_shape"])),
        *((Field("Input layout", _layout_text(model["input_layout"])),) if model.get("input_layout") else ()),
        *((Field("Output audited", model["output"], mono=True),) if model.get("output") else ()),
        Field("Classes", str(model["num_classes"])),
        *((Field("Normalisation (folded into the model)", _normalisation_text(model["normalisation"])),)
          if model.get("normalisation") else ()),
        Field("SHA-256", model["sha256"], mono=True),
        *((Field("Architecture", model["arch"], mono=True),) if model.get("arch") else ()),
        # the identity of the named module's file only, not of what it imports
        *((Field("SHA-256 of the architecture's module file", model["arch_sha256"], mono=True),)
          if model.get("arch_sha256") else ()),
    )


def _layout_text(layout: str) -> str:
    """``model.input_layout``: the graph takes channels last, the input shape above stays (C, H, W)."""
    if layout == "NHWC":
        return "NHWC: the graph takes (N, H, W, C); the auditor transposes the (C, H, W) images for it"
    return layout


def _normalisation_text(normalisation: dict) -> str:
    """``model.normalisation`` (``--mean``/``--std``): the model divides by
    std after subtracting mean, so ε is measured on the [0, 1] image before it."""
    def values(key: str) -> str:  # one value, or one per channel in brackets
        text = ", ".join(f"{value:g}" for value in normalisation[key])
        return text if len(normalisation[key]) == 1 else f"({text})"

    return f"mean {values('mean')}, std {values('std')}; ε is measured on the [0, 1] image, before the normalisation"


def _data_fields(results: dict) -> tuple[Field, ...]:
    """The data: its path (mono, like every path) unless it is the built-in
    MNIST split, the samples audited, its hash and the clean accuracy."""
    data = results["data"]
    clean = results["clean_accuracy"]
    confidence = _confidence(clean, data["n"])
    builtin = data["name"] == "mnist"
    return (
        Field("Data set", "mnist (test split)" if builtin else data["name"], mono=not builtin),
        Field("Samples audited", _samples_text(results)),
        Field("SHA-256", data["sha256"], mono=True),
        Field("Clean accuracy", f"{percent(clean)} ({confidence})" if confidence else percent(clean)),
    )


def _samples_text(results: dict) -> str:
    """Which samples of the data were audited, as far as the results show:
    a sample index beyond ``n`` means ``-n`` chose a class-balanced subset."""
    data, samples = results["data"], results["samples"]
    if len(samples) < data["n"]:  # not every sample listed: which were audited is not recorded
        return _plural(data["n"], "sample")
    if any(sample["index"] >= data["n"] for sample in samples):
        return f"class-balanced subset of {data['n']:,}"
    return f"all {_plural(data['n'], 'sample')}"


def _threat_fields(results: dict) -> tuple[Field, ...]:
    threat = results["threat"]
    return (
        Field("Access level", _access_text(results["access"]["level"])),
        Field("Why this level", results["access"]["reason"]),
        Field("Norm", f"{norm_name(threat['norm'])} ({threat['norm']})"),
        Field("ε", ", ".join(eps_text(eps) for eps in threat["eps"])),
        Field("Query budget", _budget_text(results)),
        Field("Goal", target_text(threat.get("target"))),
    )


_UNLIMITED = {"white-box": "white-box", "none": "transfer"}
"""Access levels whose attacks the query budget does not limit, by the name
of their attacks: white-box attacks have the gradients, and transfer attacks
query the model once per example, to verify it."""


def _budget_text(results: dict) -> str:
    """The query budget and the attacks it limits: only soft- and hard-label
    ones, per sample and per *run*, so a fixed-ε attack, which runs once per
    ε, may spend it on a sample once at each ε."""
    access = [attack["access"] for attack in results["attacks"]]
    if all(level in _UNLIMITED for level in access):
        return "not used: no soft- or hard-label attack ran"
    budget, eps = results["threat"]["budget"], results["threat"]["eps"]
    most = (f" (up to {budget * len(eps):,} queries on a sample over the {len(eps)} ε)"
            if budget is not None and len(eps) > 1 else "")
    text = (f"{_budget(budget)} queries per sample for each run of a soft- or hard-label attack: a fixed-ε "
            f"attack runs once per ε{most}, a minimum-norm attack once for all ε")
    unlimited = [name for level, name in _UNLIMITED.items() if level in access]
    if unlimited:
        text += f"; the {' and '.join(unlimited)} attacks are not limited by it"
    return text


def target_text(target: dict | None) -> str:
    """The audit's goal in words: untargeted, or which target class."""
    if target is None:
        return "untargeted: any wrong class counts"
    if target["mode"] == "random":
        return "targeted: a random class per sample (other than its label) must be output"
    if target["mode"] == "least-likely":
        return "targeted: the class other than its label that the model scores lowest on the clean image must be output"
    left_out = target.get("left_out", 0)
    return (f"targeted: class {target['class']} must be output "
            f"({_plural(left_out, 'sample')} of that class left out)")


def _robust_row(eps: str, accuracy: float, n: int) -> RobustRow:
    """Accuracy at one ε of the ``n`` samples; samples broken are those not robust (clean errors included)."""
    return RobustRow(eps, percent(accuracy), f"{round((1 - accuracy) * n):,} of {n:,}",
                     interval_text(accuracy, n) or MISSING)


def _attack_row(attack: dict, threat: dict) -> AttackRow:
    """One attack; its success rate is at the largest ε it ran at (a
    minimum-norm attack's within the largest audited ε). That ε is in the
    threat norm, which is named beside it for an attack in the other norm:
    "ε=0.3" beside "L2" read as an L2 radius."""
    queries = attack["queries"]
    ran_at = [run["eps"] for run in attack.get("runs", ()) if run.get("eps") is not None] or threat["eps"]
    other_norm = f" {norm_name(threat['norm'])}" if attack["norm"] != threat["norm"] else ""
    return AttackRow(
        name=attack["name"],
        access="none (transfer)" if attack["access"] == "none" else attack["access"],
        kind=attack["kind"],
        norm=norm_name(attack["norm"]),
        samples=f"{attack['samples']:,}",
        success_rate=percent(attack["success_rate"]),
        success_eps=eps_text(max(ran_at)) + other_norm if ran_at else MISSING,
        queries_mean=_count(queries["mean"]),
        queries_median=_count(queries["median"]),
        queries_p90=_count(queries["p90"]),
        queries_max=_count(queries["max"]),
        budget="1 (its verification)" if attack["access"] == "none" else _budget(queries["budget"]),
        seconds=f"{attack['seconds']:.1f} s",
        paper=attack["paper"],
        params=_params(attack["params"]),
    )


def _query_runs(results: dict) -> list[tuple[dict, dict]]:
    """(attack, run) for each black-box attack at each ε it has a query cost
    for, from the largest ε to the smallest, where the cost is highest: a
    fixed-ε attack's runs, and a minimum-norm run's ``success_by_eps``
    entries (which carry a run's fields for one ε).

    Results written before runs carried query curves have none to show."""
    found = []
    for attack in results["attacks"]:
        if attack["queries"]["budget"] is not None:
            runs = [run for run in attack.get("runs", ()) if "success_curve" in run]
            runs += [{**at_eps, "samples": run["samples"]} for run in attack.get("runs", ())
                     for at_eps in run.get("success_by_eps", ())]
            found += [(attack, run) for run in sorted(runs, key=lambda run: run["eps"], reverse=True)]
    return found


def _query_note(results: dict) -> str:
    """The sentence on how the black-box minimum-norm attacks' query cost is
    read ("" when none ran)."""
    budgeted = [attack for attack in results["attacks"] if attack["queries"]["budget"] is not None]
    read = _min_norm_names(budgeted, lambda run: "success_by_eps" in run)
    other = [name for name in _min_norm_names(budgeted, lambda run: "distortion_at_queries" in run)
             if name not in read]
    sentences = []
    if read:
        kind = "is a minimum-norm attack" if len(read) == 1 else "are minimum-norm attacks"
        sentences.append(f"{', '.join(read)} {kind}: one run without a fixed ε, which keeps refining its examples "
                         "until the budget is spent. A sample counts as broken at ε from the query at which its "
                         "best example first came within ε.")
    if other:
        sentences.append(f"{', '.join(other)}: minimum-norm, with no success curve here"
                         + (" (another norm than the threat's)." if all(
                             attack["norm"] != results["threat"]["norm"]
                             for attack in budgeted if attack["name"] in other) else "."))
    if sentences:
        sentences.append("How the distortion shrinks with the queries spent is under “Distortion against "
                         "queries” below.")
    return " ".join(sentences)


def _min_norm_names(attacks: list[dict], has) -> list[str]:
    """Names of the attacks with a run that ``has`` accepts, in order."""
    return list(dict.fromkeys(attack["name"] for attack in attacks if any(has(run) for run in attack.get("runs", ()))))


def _query_row(attack: dict, run: dict) -> QueryRow:
    stats = run["queries_to_success"]
    return QueryRow(
        name=attack["name"],
        eps=eps_text(run["eps"]),
        samples=f"{run['samples']:,}",
        success_rate=percent(run["broken"] / run["samples"] if run["samples"] else None),
        mean=_count(stats["mean"]),
        median=_count(stats["median"]),
        p90=_count(stats["p90"]),
        budget=_budget(stats["budget"]),
    )


def _svg(figure: Figure) -> Markup:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    # Our own matplotlib output, embedded inline: the only markup the report trusts.
    return Markup(svg[svg.index("<svg"):])


_COLOURS = tuple(matplotlib.colormaps["tab10"].colors)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_DASHES = ("-", "--", "-.", ":")


def _series_style(number: int) -> dict:
    """The style of a chart's ``number``-th series. Colour and marker cycle
    with periods 10 and 7 and the dash pattern changes every 10 series, so
    the first 280 series all look different."""
    return {"color": _COLOURS[number % len(_COLOURS)], "marker": _MARKERS[number % len(_MARKERS)],
            "linestyle": _DASHES[number // len(_COLOURS) % len(_DASHES)]}


def _distinct_series(series: list[tuple[str, list, list]]) -> list[tuple[str, list, list]]:
    """(label, xs, ys) series with the same points merged into one, labelled
    with every name: drawn apart, the last would hide the others, leaving
    legend entries that point at nothing."""
    labels: dict[tuple, list[str]] = {}
    for label, xs, ys in series:
        labels.setdefault((tuple(xs), tuple(ys)), []).append(label)
    return [
        (textwrap.fill(names[0] if len(names) == 1 else " = ".join(names) + " (overlapping)", 42,
                       break_on_hyphens=False), list(xs), list(ys))
        for (xs, ys), names in labels.items()
    ]


def _drawable(series: list[tuple[str, list, list]]) -> bool:
    """Whether some series has two points or more: a chart of single points
    (one query checkpoint) shows nothing its table does not."""
    return any(len(xs) > 1 for _, xs, _ in series)


def _query_chart(results: dict) -> Markup | None:
    """Success rate against queries (log scale) for each black-box attack at each ε (:func:`_query_runs`)."""
    series = [
        (f"{attack['name']} (ε={eps_text(run['eps'])})", run["success_curve"]["queries"],
         [math.nan if rate is None else rate * 100 for rate in run["success_curve"]["success_rate"]])
        for attack, run in _query_runs(results)
    ]
    if not _drawable(series):
        return None
    with matplotlib.style.context("default"), matplotlib.rc_context(_CHART_RC):
        figure = Figure(figsize=(7.0, 2.8), layout="constrained")
        axes = figure.add_subplot()
        for number, (label, xs, ys) in enumerate(_distinct_series(series)):
            axes.step(xs, ys, where="post", markersize=3, linewidth=1.4, label=label, **_series_style(number))
        axes.set_xscale("log")
        axes.set_ylim(-4, 104)
        axes.yaxis.set_major_locator(FixedLocator(range(0, 101, 20)))
        axes.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        axes.set_xlabel("queries per sample")
        axes.set_ylabel("success rate")
        axes.grid(alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)
        return _svg(figure)


def _distortion_runs(results: dict) -> list[tuple[dict, dict]]:
    """(attack, its distortion-at-queries record) for minimum-norm runs with a trace."""
    return [
        (attack, run["distortion_at_queries"])
        for attack in results["attacks"]
        for run in attack.get("runs", ())
        if "distortion_at_queries" in run
    ]


def _distortion_value(value: float | None) -> str:
    return "not yet found" if value is None else f"{value:.3g}"


def _distortion_rows(results: dict) -> tuple[DistortionRow, ...]:
    rows = []
    for attack, curve in _distortion_runs(results):
        for queries, median, mean, found in zip(curve["queries"], curve["median"], curve["mean_found"],
                                                curve["found"]):
            rows.append(DistortionRow(
                name=attack["name"], norm=norm_name(attack["norm"]), queries=f"{queries:,}",
                median=_distortion_value(median), mean_found=_distortion_value(mean),
                found=f"{found:,} of {attack['samples']:,}",
            ))
    return tuple(rows)


def _distortion_chart(results: dict) -> Markup | None:
    """Median distortion against queries (log scale) for each minimum-norm attack."""
    series = []
    for attack, curve in _distortion_runs(results):
        points = [(q, m) for q, m in zip(curve["queries"], curve["median"]) if m is not None]
        if points:
            series.append((f"{attack['name']} ({norm_name(attack['norm'])})", *map(list, zip(*points))))
    if not _drawable(series):
        return None
    with matplotlib.style.context("default"), matplotlib.rc_context(_CHART_RC):
        figure = Figure(figsize=(7.0, 2.8), layout="constrained")
        axes = figure.add_subplot()
        for number, (label, xs, ys) in enumerate(_distinct_series(series)):
            axes.plot(xs, ys, markersize=3, linewidth=1.4, label=label, **_series_style(number))
        axes.set_xscale("log")
        axes.set_xlabel("queries per sample")
        axes.set_ylabel("median distortion")
        axes.grid(alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)
        return _svg(figure)


_HEADING = re.compile(r"^## (\S+)[ \t]*$", re.MULTILINE)
_LEVEL_LEAD = re.compile(r"^\*\*(?:info|warning|error)\.\*\*\s*")
_LINK_ASIDE = re.compile(r"\s*\(\[[^\]]*\]\([^)]*\)\)")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")


def check_explanations() -> dict[str, tuple[str, ...]]:
    """Each check id's paragraphs in the shipped ``docs/checks.md``, as plain
    text: without the leading level (the report shows it), emphasis and code
    marks; a report has nowhere to link to, so a link keeps its text and a
    parenthesised link ("([policies](policies.md#requirements))") goes."""
    parts = _HEADING.split((docs_dir() / CHECKS_DOC).read_text(encoding="utf-8"))
    explanations = {}
    for check_id, body in zip(parts[1::2], parts[2::2]):
        text = _LINK.sub(r"\1", _LINK_ASIDE.sub("", _LEVEL_LEAD.sub("", body.strip())))
        text = text.replace("**", "").replace("`", "")
        text = text[:1].upper() + text[1:]  # "error below 100 queries ..." once its marks are gone
        blocks = text.split("\n\n")
        explanations[check_id] = tuple(" ".join(block.split()) for block in blocks if block.strip())
    return explanations


def _check_notes(checks: list[dict]) -> tuple[CheckNote, ...]:
    """One note per check id raised, in order of first appearance."""
    if not checks:
        return ()
    explanations = check_explanations()
    unknown = ("This auditor version's documentation does not describe this check.",)
    ids = dict.fromkeys(check["id"] for check in checks)
    return tuple(CheckNote(check_id, explanations.get(check_id, unknown)) for check_id in ids)


_ACCURACY_REQUIREMENT = re.compile(r"(?:clean|robust) accuracy >= ")
_LEADING_FRACTION = re.compile(r"^(\d+(?:\.\d+)?(?:e-?\d+)?)(?= at |$)")


def _policy(policy: dict | None) -> PolicyView | None:
    if policy is None:
        return None
    rows = []
    for item in policy["requirements"]:
        description, actual = _requirement_texts(item["description"], str(item["actual"]))
        rows.append(RequirementRow(item["id"], description, bool(item["passed"]), actual))
    requirements = tuple(rows)
    return PolicyView(policy["name"], policy.get("description"), bool(policy["passed"]), requirements)


def _requirement_texts(description: str, actual: str) -> tuple[str, str]:
    """A requirement and its recorded value as the report shows them: a
    clean or robust accuracy requirement's threshold and value, which
    results.json holds as fractions (``"clean accuracy >= 0.95"``,
    ``"0.15 at ε=0.1"``), as percentages (``"95 %"``, ``"15.0 % at ε=0.1"``):
    the threshold with every digit it was written with, the value with
    enough decimals not to read as the threshold."""
    accuracy = _ACCURACY_REQUIREMENT.match(description)
    if accuracy is None:
        return description, actual
    threshold_text = description[accuracy.end():]
    threshold = _LEADING_FRACTION.match(threshold_text)
    if threshold is None:
        return description, actual
    shown = _LEADING_FRACTION.sub(lambda number: exact_percent(number[1]), threshold_text)
    value = _LEADING_FRACTION.sub(lambda number: percent_beside(float(number[1]), threshold[1]), actual)
    return description[:accuracy.end()] + shown, value


def _distortion(results: dict) -> DistortionSummary:
    """The samples' smallest verified distortions, split at the largest
    audited ε (within its verification bound: broken under the threat model;
    beyond it: found by a minimum-norm attack, robust under the threat
    model). Clean errors (distortion 0) are counted apart."""
    samples, audited = results["samples"], results["threat"]["eps"]
    bound = eps_bound(max(audited)) if audited else 0.0
    found = [sample["distortion"] for sample in samples if sample["distortion"] is not None]
    broken = [distortion for distortion in found if 0 < distortion <= bound]
    beyond = [distortion for distortion in found if distortion > bound]
    return DistortionSummary(
        norm=norm_name(results["threat"]["norm"]),
        largest_eps=eps_text(max(audited)) if audited else MISSING,
        broken=_plural(len(broken), "sample"),
        median=f"{statistics.median(broken):.3g}" if broken else MISSING,
        mean=f"{statistics.fmean(broken):.3g}" if broken else MISSING,
        beyond=_plural(len(beyond), "sample") if beyond else "",
        beyond_median=f"{statistics.median(beyond):.3g}" if beyond else MISSING,
        clean_errors=_plural(len(found) - len(broken) - len(beyond), "sample"),
        not_broken=_plural(len(samples) - len(found), "sample"),
        eps_50=_eps_50_text(results),
    )


def _eps_50_text(results: dict) -> str:
    """The sentence on ``eps_50``, the lower median of the per-sample
    distortions (:func:`auditor.eps.eps_at_half`).

    Each distortion is the smallest an attack found, not the smallest there
    is, and a fixed-ε attack's example lies at the ε it ran at (said only
    where one holds a sample's record), so robust accuracy reaches 50 % *at
    or below* ``eps_50``. Beyond the largest
    audited ε only minimum-norm attacks find examples: there ``eps_50`` is
    outside the threat model, and the sentence says so. Either way the ε
    shown keeps "at or below" true (:func:`_eps_50_shown`).
    """
    if "eps_50" not in results:
        return ""
    eps_50, largest = results["eps_50"], max(results["threat"]["eps"], default=0.0)
    if eps_50 is None:
        return ("More than half of the samples have no adversarial example from any attack, so the audit "
                "finds no ε at which robust accuracy falls to 50 %.")
    if eps_50 == 0:
        return ("Half of the samples or more are misclassified without an attack: robust accuracy is 50 % or "
                "less at every ε.")
    shown = _eps_50_shown(eps_50, results["threat"]["eps"])
    if eps_50 <= eps_bound(largest):
        fixed_eps = {attack["name"] for attack in results["attacks"] if attack["kind"] == FIXED_EPS}
        fixed = any(sample.get("broken_by") in fixed_eps for sample in results["samples"])
        return (f"Robust accuracy falls to 50 % at or below ε = {shown}: half of the samples have a "
                f"verified adversarial example within that distance. This ε is an upper bound: the attacks find "
                f"small distortions, not always the smallest"
                + (", and a fixed-ε attack's examples lie at the ε it ran at." if fixed else "."))
    return (f"Robust accuracy stays above 50 % at every audited ε (up to {eps_text(largest)}). Minimum-norm "
            f"attacks found adversarial examples within ε = {shown} of half of the samples: beyond the "
            f"audited ε, outside the threat model, robust accuracy falls to 50 % at or below "
            f"ε = {shown}.")


def _eps_50_shown(eps_50: float, audited: list[float]) -> str:
    """``eps_50`` as the report writes it, so that "falls to 50 % at or
    below" it stays true: an audited ε it lies at (a fixed-ε attack's
    examples; within that ε as the report counts it, round-off slack
    included, and ``8/255`` as such), else rounded *up* to 3 significant
    figures, never below the stored value (0.082947 reads 0.083, not 0.0829)."""
    for eps in audited:
        if eps - 1e-6 <= eps_50 <= eps_bound(eps):  # the 6-decimal rounding either way, within ε
            return eps_text(eps)
    exact = Decimal(repr(eps_50))
    return f"{float(exact.quantize(Decimal(1).scaleb(exact.adjusted() - 2), rounding=ROUND_CEILING)):g}"


def _spread(ticks: list[float], share: float = 1 / 12) -> list[float]:
    """Ticks at least ``share`` of the axis apart, so that their labels do
    not overlap: the first and the last are always kept, and a tick too
    close to a kept one is left out (its points still show on the curves)."""
    gap = (ticks[-1] - ticks[0]) * share
    kept = [ticks[0]]
    for tick in ticks[1:-1]:
        if tick - kept[-1] >= gap and ticks[-1] - tick >= gap:
            kept.append(tick)
    return [*kept, ticks[-1]] if len(ticks) > 1 else kept


def _manifest_fields(results: dict) -> tuple[Field, ...]:
    fields = [
        Field("auditor", results["auditor_version"] or "(version unknown)"),
        Field("Seed", str(results["seed"])),
        Field("Started", _date(results["started"])),
        Field("Duration", f"{results['seconds']:.1f} s"),
        Field("Model SHA-256", results["model"]["sha256"], mono=True),
        Field("Data SHA-256", results["data"]["sha256"], mono=True),
    ]
    fields += [
        Field(key, str(value), mono=key == "command") for key, value in results["manifest"].items()
    ]
    return tuple(fields)


def _chart(results: dict) -> Markup | None:
    """Robust accuracy vs ε: the worst case over all attacks and each attack's cumulative curve.

    The attack curves are drawn over the thick worst-case curve, so the last
    attack's curve (which equals the worst case) stays visible; attacks after
    which the curve did not change share one line. ε = 0 is clean
    accuracy. Returns inline SVG (without the XML prolog), or None when no
    attack ran.
    """
    overall = results["robust_accuracy"]
    if not overall:
        return None
    clean = results["clean_accuracy"]
    with matplotlib.style.context("default"), matplotlib.rc_context(_CHART_RC):
        figure = Figure(figsize=(7.0, 3.0), layout="constrained")
        axes = figure.add_subplot()
        axes.plot(*_curve_points(overall, clean), label="worst case (all attacks)",
                  marker="s", markersize=7, linewidth=3.2, color="black")
        series = [(f"after {attack['name']}", *_curve_points(attack["robust_accuracy"], clean))
                  for attack in results["attacks"] if attack["robust_accuracy"]]
        for number, (label, xs, ys) in enumerate(_distinct_series(series)):
            axes.plot(xs, ys, label=label, markersize=4, linewidth=1.2, **_series_style(number))
        ticks = _spread([0.0] + [float(eps) for eps in _sorted_eps(overall)])
        axes.xaxis.set_major_locator(FixedLocator(ticks))
        axes.xaxis.set_major_formatter(lambda value, _: eps_text(value))
        axes.set_ylim(-4, 104)  # room for markers at 0 % and 100 %
        axes.yaxis.set_major_locator(FixedLocator(range(0, 101, 20)))
        axes.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        axes.set_xlabel(f"ε ({norm_name(results['threat']['norm'])})")
        axes.set_ylabel("robust accuracy")
        axes.grid(alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)
        return _svg(figure)


def _curve_points(accuracies: dict[str, float], clean: float) -> tuple[list[float], list[float]]:
    """A robust accuracy curve's points in percent, from clean accuracy at ε = 0."""
    eps = _sorted_eps(accuracies)
    return [0.0] + [float(value) for value in eps], [clean * 100] + [accuracies[value] * 100 for value in eps]


def _points(before: float, after: float) -> str:
    """A change of accuracy in percentage points, signed."""
    return f"{(after - before) * 100:+.1f} pp"


def _optional(value: float | None, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def _hardening(record: dict | None) -> HardeningView | None:
    """The Hardening section of a ``results.json`` written by ``auditor harden`` (None otherwise)."""
    if record is None:
        return None
    config, method = record["config"], record["method"]
    before, after = record["before"], record["after"]
    norm = norm_name(record["threat"]["norm"])
    comparison = [ComparisonRow("Clean accuracy", percent(before["clean_accuracy"]),
                                percent(after["clean_accuracy"]),
                                _points(before["clean_accuracy"], after["clean_accuracy"]))]
    for eps in _sorted_eps(after["robust_accuracy"]):
        was, now = before["robust_accuracy"][eps], after["robust_accuracy"][eps]
        comparison.append(ComparisonRow(f"Robust accuracy at ε={eps_text(eps)} ({norm})", percent(was), percent(now),
                                        _points(was, now)))
    scale = method["params"].get("eps_scale", 1.0)
    curve = tuple(
        CurveRow(
            epoch=str(row["epoch"]), eps=f"{row['eps']:.3g}", radius=f"{row['eps'] * scale:.3g}",
            lr=_optional(row["lr"], ".2g"),
            loss=_optional(row["loss"], ".3f"), train_accuracy=percent(row["train_accuracy"]),
            clean=percent(row["clean"]), fgsm=percent(row["fgsm"]), pgd=percent(row["pgd"]),
        )
        for row in record["curve"]
    )
    guard = record["guard"]
    events = tuple(f"Epoch {event['epoch']}, update {event['iteration']}: {event['message']}"
                   for event in guard["events"])
    if not guard["enabled"]:
        guard_text = "The guard was disabled (--no-guard): checks were recorded, nothing was acted on."
    elif any(event["action"] == "rollback" for event in guard["events"]):
        guard_text = "The guard rolled training back to its best weights and stopped it."
    else:
        guard_text = "The guard checked every epoch and never had to act."
    planned = record.get("epochs_planned", config["epochs"])  # older records lack it (right for fast, pgd)
    replays = method["params"].get("replays")
    unit = "epochs" if replays is None else f"passes over the data, each minibatch replayed {replays} times"
    stopped = " (stopped early)" if record["stopped_early"] else ""
    epochs = f"{record['epochs_run']} of {planned} {unit}{stopped}"
    summary = (f"{method['label']} for {epochs} at ε={eps_text(record['threat']['eps'])} "
               f"({norm}) took {record['training_seconds']:.1f} s of training; robust accuracy went from "
               f"{comparison[-1].before} to {comparison[-1].after}, clean accuracy from "
               f"{comparison[0].before} to {comparison[0].after}.")
    attack = guard["attack"]
    radius = record["threat"]["eps"] * scale
    settings = (
        Field("Method", f"{method['label']} ({method['name']})"),
        Field("Method settings", _params(method["params"]) + _step_text(method["params"], radius)),
        Field("Threat", f"ε={eps_text(record['threat']['eps'])}, {norm}; training radius {scale:g}·ε = "
                        f"{eps_text(record['threat']['eps'] * scale)}"),
        Field("Epochs", f"{epochs}, {record['updates']:,} updates"),
        Field("Optimiser", f"Adam, batch {config['batch_size']}, triangular cyclic learning rate peaking at "
                           f"{config['lr_max']:g} after {config['lr_peak']:.0%} of the updates"),
        Field("ε warm-up", f"linear over the first {config['eps_warmup']:.0%} of the updates"
              if config["eps_warmup"] else "none"),
        Field("Training data", f"{_training_data_name(record['data']['name'])}: "
                               f"{record['data']['train']:,} images, {record['data']['guard']:,} held out for the guard"),
        Field("Scan data", _scan_data(record["data"])),
        Field("Guard", f"{attack['name']}, {attack['steps']} steps, on the held-out batch; roll back when "
                       f"PGD accuracy falls more than {guard['drop'] * 100:g} points below its best"
              + ("" if guard["enabled"] else " (disabled)")),
        Field("Device", record["device"]["name"] + (", mixed precision" if record["device"]["amp"] else "")),
        Field("Wall time", f"{record['training_seconds']:.1f} s training, {record['seconds']:.1f} s in all"),
        Field("Seed", str(record["seed"])),
    )
    output = (
        Field("Hardened model", record["output"]["path"], mono=True),
        Field("Format", record["output"]["format"]),
        Field("SHA-256", record["output"]["sha256"], mono=True),
        Field("Export check", f"max abs logit difference {record['output']['check']['max_abs_diff']:.2g} "
                              f"on {record['output']['check']['images']} images"),
        Field("Original model", record["model"]["path"], mono=True),
        Field("Original SHA-256", record["model"]["sha256"], mono=True),
    )
    curve_note = (
        f"ε and the learning rate are their values at the end of each epoch. The learning rate follows a "
        f"triangular cycle: from 0 up to its peak {config['lr_max']:g} at {config['lr_peak'] * 100:g} % of the updates, "
        f"then down to 0 at the last update, so the last epoch of a full run ends at 0. The training "
        f"adversary used a radius of {scale:g}·ε; the guard and the scans use ε itself."
    )
    return HardeningView(method=method["label"], paper=method["paper"], summary=summary, settings=settings,
                         comparison=tuple(comparison), curve=curve, radius_scale=f"{scale:g}",
                         curve_note=curve_note, chart_svg=_training_chart(record),
                         guard=guard_text, events=events, output=output)


def _step_text(params: dict, radius: float) -> str:
    """The attack step as a number: ``alpha`` is a multiple of the training
    radius, so "alpha=1.5" alone reads as Wong et al.'s 1.25·ε when it is 1.8·ε."""
    alpha = params.get("alpha")
    if alpha is None:
        return ""
    return f"; step alpha × training radius = {alpha:g} × {eps_text(radius)} = {alpha * radius:.3g}"


def _training_data_name(name: str) -> str:
    return "mnist (train split)" if name == "mnist" else name


def _scan_data(data: dict) -> str:
    """Where the before/after scans ran, with a warning when that is the training data."""
    if data["eval"] == "mnist":
        return "mnist (test split)"
    if data["eval_is_training_data"]:
        return f"{data['eval']} (the training data: before/after overstate robustness)"
    return data["eval"]


def _training_chart(record: dict) -> Markup:
    """Clean, FGSM and PGD accuracy on the guard batch per epoch (epoch 0: the original model),
    with the guard's rollbacks marked."""
    curve = record["curve"]
    epochs = [row["epoch"] for row in curve]
    with matplotlib.style.context("default"), matplotlib.rc_context(_CHART_RC):
        figure = Figure(figsize=(7.0, 2.8), layout="constrained")
        axes = figure.add_subplot()
        lines = (("clean", "clean", "o"), ("fgsm", "FGSM", "^"), ("pgd", "PGD (guard)", "s"))
        for key, label, marker in lines:
            axes.plot(epochs, [row[key] * 100 for row in curve], marker=marker, markersize=4, linewidth=1.4,
                      label=label)
        for event in record["guard"]["events"]:
            axes.axvline(event["epoch"], color="#b91c1c", linestyle="--", linewidth=1.0,
                         label=f"guard: {event['action']}")
        axes.xaxis.set_major_locator(FixedLocator(epochs))
        axes.set_ylim(-4, 104)
        axes.yaxis.set_major_locator(FixedLocator(range(0, 101, 20)))
        axes.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        axes.set_xlabel("epoch")
        axes.set_ylabel("accuracy on the guard batch")
        axes.grid(alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)
        return _svg(figure)
