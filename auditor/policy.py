"""Policies: CI gates over a results.json.

A policy is a YAML file with a name and a list of requirements. Each
requirement is a pure predicate over the results dict and yields a
:class:`Verdict`; the policy passes when every requirement does. The syntax
and semantics are documented in ``docs/policies.md``.

Loading is strict: unknown keys, wrong types and out-of-range values raise an
:class:`~auditor.errors.AuditError` whose one-line message names the file and
the problem. Evaluation fails closed: a requirement that the results cannot
show (an ε that was not evaluated, a missing field, figures that the scan's
own checks call untrustworthy) fails.
"""

from __future__ import annotations

import abc
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

from . import checks
from .access import Access
from .eps import default_eps, eps_key, eps_text, parse_eps
from .errors import AuditError, short_reason
from .resources import policies_dir

NORMS = ("linf", "l2")
CHECK_LEVELS = ("info", "warning", "error")  # in increasing severity
CHECK_IDS = frozenset(checks.IDS)
"""The ids of the checks of ``auditor/checks.py``: what ``no_checks`` may cite.
A misspelt id would never be raised, and the requirement would pass on anything."""
EPS_EXTREMES = ("min", "max")
BATTERIES = ("default", "any")

_ACCESS_BY_NAME = {level.cli_name: level for level in Access}
_TOP_LEVEL_KEYS = ("policy", "description", "requirements")


# --------------------------------------------------------------------------- #
# Verdicts and results
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Verdict:
    """The outcome of one requirement on one results dict."""

    id: str
    description: str
    passed: bool
    actual: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of one entry of ``PolicyResult.to_dict()["requirements"]``."""
        return {
            "id": self.id,
            "description": self.description,
            "passed": self.passed,
            "actual": self.actual,
        }


@dataclass(frozen=True)
class PolicyResult:
    """The outcome of a whole policy: passed when every requirement passed."""

    name: str
    passed: bool
    verdicts: tuple[Verdict, ...]
    description: str | None = None
    """The policy file's ``description``, for reports."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored under ``"policy"`` in results.json."""
        return {
            "name": self.name,
            "description": self.description,
            "passed": self.passed,
            "requirements": [verdict.to_dict() for verdict in self.verdicts],
        }


# --------------------------------------------------------------------------- #
# Load-time validation helpers
# --------------------------------------------------------------------------- #


class _Source:
    """Where a policy comes from; builds one-line errors that name it."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, problem: str) -> AuditError:
        """An AuditError for ``problem`` in this policy file."""
        return AuditError(f"policy {self.path}: {problem}")


def _check_keys(
    spec: Mapping[str, Any],
    allowed: tuple[str, ...],
    required: tuple[str, ...],
    where: str,
    source: _Source,
) -> None:
    """Reject keys outside ``allowed`` and missing ``required`` ones."""
    for key in spec:
        if key not in allowed:
            raise source.error(
                f"{where}: unknown key {_shown(key)}; allowed: {', '.join(allowed)}"
            )
    for key in required:
        if key not in spec:
            raise source.error(f"{where}: missing required key {key!r}")


def _options(
    value: Any,
    allowed: tuple[str, ...],
    required: tuple[str, ...],
    where: str,
    source: _Source,
) -> Mapping[str, Any]:
    """The options mapping of a requirement, with its keys checked."""
    if not isinstance(value, dict):
        raise source.error(
            f"{where}: expected a mapping with keys {', '.join(allowed)}, "
            f"got {type(value).__name__}"
        )
    _check_keys(value, allowed, required, where, source)
    return value


def _is_number(value: Any) -> bool:
    """An int or float; YAML booleans are not numbers here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any, limit: int = 60) -> str:
    """``value`` as an error message shows it: its repr, cut to ``limit``
    characters, since a wrong value in a policy file may be long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _got(value: Any) -> str:
    """``value`` as an error message shows it, with a hint for text YAML
    took for a number (``1e-1``: YAML 1.1 reads exponents without a dot as text)."""
    try:
        number = isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        number = False
    hint = " (text to YAML: write a number with a dot, e.g. 1.0e-1)" if number else ""
    return _shown(value) + hint


def _fraction(value: Any, where: str, source: _Source) -> float:
    """A number in [0, 1] (an accuracy threshold)."""
    if not _is_number(value) or not 0 <= value <= 1:
        raise source.error(f"{where}: expected a number in [0, 1], got {_got(value)}")
    return float(value)


def _count(value: Any, where: str, source: _Source) -> int:
    """An integer >= 0 (a query threshold)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise source.error(f"{where}: expected an integer >= 0, got {_shown(value)}")
    return value


def _choice(value: Any, choices: tuple[str, ...], where: str, source: _Source) -> str:
    """One of a fixed set of strings."""
    if value not in choices:
        raise source.error(
            f"{where}: expected one of {', '.join(choices)}, got {_shown(value)}"
        )
    return value


def _access(value: Any, where: str, source: _Source) -> Access:
    """An access level by its CLI name (``white-box``, ``hard-label``, ...)."""
    return _ACCESS_BY_NAME[_choice(value, tuple(_ACCESS_BY_NAME), where, source)]


def _eps(value: Any, where: str, source: _Source) -> float | str:
    """A finite ε >= 0 (a number or a fraction such as ``8/255``), or
    "min"/"max" (resolved against the standard radii later, see :func:`~auditor.eps.default_eps`)."""
    if value in EPS_EXTREMES:
        return value
    error = source.error(
        f"{where}: expected a number >= 0, 'min' or 'max', got {_got(value)} (a number may be a fraction such as 8/255)"
    )
    if isinstance(value, str) and "/" in value:
        try:
            value = parse_eps(value)
        except ValueError:
            raise error from None
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise error
    return float(value)


# --------------------------------------------------------------------------- #
# Formatting helpers
# --------------------------------------------------------------------------- #


def _fmt_fraction(value: float) -> str:
    """Two decimals, or every digit when two would round the value (a
    threshold of 0.9000001 must not read as 0.9)."""
    return f"{value:.2f}" if round(value, 2) == value else repr(float(value))


def _fmt_eps(eps: float | str) -> str:
    """An ε as the report shows it (``0.3``, ``8/255``), or ``min``/``max``."""
    return eps if isinstance(eps, str) else eps_text(eps)


def _narrowed(results: Mapping[str, Any]) -> str | None:
    """The reason a ``battery: default`` requirement fails: the scan's
    battery left out default attacks (a ``custom-battery`` check), else None."""
    for check in results.get("checks") or []:
        if check.get("id") == checks.CUSTOM_BATTERY:
            return f"the scan left out default attacks ({checks.CUSTOM_BATTERY}); battery: any accepts it"
    return None


def _untrusted(results: Mapping[str, Any], figures: str) -> str | None:
    """The reason a robustness or cost requirement fails: the results carry a
    check at level ``error`` (or one auditor does not know, as
    ``no_checks_at`` ranks it), which says that their ``figures`` cannot be
    trusted (``small-budget`` below 100 queries, ``nan-gradients``); else None.
    Those checks ran on the very scan, so no bar may pass on its numbers."""
    error = CHECK_LEVELS.index("error")
    raised = list(dict.fromkeys(
        str(check.get("id", "?"))
        for check in results.get("checks") or []
        if _check_rank(check.get("level")) >= error
    ))
    if not raised:
        return None
    carried = "an error-level check" if len(raised) == 1 else "error-level checks"
    return f"the results carry {carried} ({', '.join(raised)}): their {figures} cannot be trusted"


def _is_image_shape(shape: Any) -> bool:
    """A (C, H, W) list of sizes >= 1, as a scan records ``model.input_shape``."""
    return isinstance(shape, list) and len(shape) == 3 and all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in shape
    )


# --------------------------------------------------------------------------- #
# Requirements
# --------------------------------------------------------------------------- #


class Requirement(abc.ABC):
    """A pure predicate over a results dict.

    Subclasses are frozen dataclasses with an ``id`` field. ``KEY`` is the
    requirement's key in the policy file; :meth:`parse` builds an instance
    from the value under that key.
    """

    KEY: ClassVar[str]
    id: str

    @classmethod
    @abc.abstractmethod
    def parse(cls, rid: str, value: Any, where: str, source: _Source) -> "Requirement":
        """Build the requirement from its policy value, or raise AuditError."""

    @abc.abstractmethod
    def describe(self) -> str:
        """What the requirement demands, in words."""

    @abc.abstractmethod
    def evaluate(self, results: Mapping[str, Any]) -> Verdict:
        """Judge one results dict."""

    def _verdict(self, passed: bool, actual: str) -> Verdict:
        """A verdict of this requirement with its id and description."""
        return Verdict(self.id, self.describe(), passed, actual)


@dataclass(frozen=True)
class CleanAccuracy(Requirement):
    """``clean_accuracy: {min: X}``: accuracy on unperturbed inputs >= X."""

    KEY: ClassVar[str] = "clean_accuracy"

    id: str
    min: float

    @classmethod
    def parse(cls, rid: str, value: Any, where: str, source: _Source) -> "CleanAccuracy":
        spec = _options(value, ("min",), ("min",), where, source)
        return cls(rid, _fraction(spec["min"], f"{where}.min", source))

    def describe(self) -> str:
        return f"clean accuracy >= {_fmt_fraction(self.min)}"

    def evaluate(self, results: Mapping[str, Any]) -> Verdict:
        accuracy = results.get("clean_accuracy")
        if accuracy is None:
            return self._verdict(False, "clean accuracy was not recorded")
        return self._verdict(accuracy >= self.min, _fmt_fraction(accuracy))


@dataclass(frozen=True)
class RobustAccuracy(Requirement):
    """``robust_accuracy: {min, eps, norm?, access?, battery?}``: accuracy under attack >= min."""

    KEY: ClassVar[str] = "robust_accuracy"

    id: str
    min: float
    eps: float | str
    norm: str | None = None
    access: Access | None = None
    battery: str = "default"

    @classmethod
    def parse(cls, rid: str, value: Any, where: str, source: _Source) -> "RobustAccuracy":
        spec = _options(value, ("min", "eps", "norm", "access", "battery"), ("min", "eps"), where, source)
        norm = spec.get("norm")
        access = spec.get("access")
        return cls(
            rid,
            min=_fraction(spec["min"], f"{where}.min", source),
            eps=_eps(spec["eps"], f"{where}.eps", source),
            norm=None if norm is None else _choice(norm, NORMS, f"{where}.norm", source),
            access=None if access is None else _access(access, f"{where}.access", source),
            battery=_choice(spec.get("battery", "default"), BATTERIES, f"{where}.battery", source),
        )

    def describe(self) -> str:
        norm = f"{self.norm} " if self.norm else ""
        access = f" ({self.access.cli_name})" if self.access is not None else ""
        return (
            f"robust accuracy >= {_fmt_fraction(self.min)} "
            f"at {norm}ε={_fmt_eps(self.eps)}{access}"
        )

    def evaluate(self, results: Mapping[str, Any]) -> Verdict:
        threat = results.get("threat") or {}
        if self.norm is not None and threat.get("norm") != self.norm:
            return self._verdict(False, f"results are for {threat.get('norm')}")
        if threat.get("target"):
            # only hitting the target counted: any other misclassification
            # under attack was left robust
            return self._verdict(False, "results are from a targeted audit")
        untrusted = _untrusted(results, "robust accuracy")
        if untrusted:
            return self._verdict(False, untrusted)
        narrowed = _narrowed(results) if self.battery == "default" else None
        if narrowed:
            return self._verdict(False, narrowed)
        if self.access is not None:
            level_name = (results.get("access") or {}).get("level")
            level = _ACCESS_BY_NAME.get(level_name)
            if level is None:
                return self._verdict(False, f"unknown access level {level_name!r} in results")
            if level < self.access:
                return self._verdict(
                    False,
                    f"results at {level.cli_name} access cannot show robustness "
                    f"against {self.access.cli_name}",
                )
        eps = self.eps
        if isinstance(eps, str):
            norm, shape = threat.get("norm"), (results.get("model") or {}).get("input_shape")
            if norm not in NORMS:
                return self._verdict(False, f"ε={eps} has no standard value for norm {norm}")
            if not _is_image_shape(shape):
                return self._verdict(
                    False, f"the results record no image shape (C, H, W): ε={eps} has no standard value"
                )
            # the standard radii, not threat.eps: those are the audited party's choice,
            # and one tiny extra --eps made min pass any model
            standard = default_eps(tuple(shape), norm)
            eps = min(standard) if eps == "min" else max(standard)
        accuracy = (results.get("robust_accuracy") or {}).get(eps_key(eps))
        if accuracy is None:
            return self._verdict(False, f"ε={eps_text(eps)} was not evaluated")
        return self._verdict(accuracy >= self.min, f"{_fmt_fraction(accuracy)} at ε={eps_text(eps)}")


@dataclass(frozen=True)
class MedianQueries(Requirement):
    """``median_queries: {min, access, battery?}``: the cheapest attack of a level needs >= min queries."""

    KEY: ClassVar[str] = "median_queries"

    id: str
    min: int
    access: Access
    battery: str = "default"

    @classmethod
    def parse(cls, rid: str, value: Any, where: str, source: _Source) -> "MedianQueries":
        spec = _options(value, ("min", "access", "battery"), ("min", "access"), where, source)
        return cls(
            rid,
            min=_count(spec["min"], f"{where}.min", source),
            access=_access(spec["access"], f"{where}.access", source),
            battery=_choice(spec.get("battery", "default"), BATTERIES, f"{where}.battery", source),
        )

    def describe(self) -> str:
        return (
            f"median queries to success >= {self.min} "
            f"(cheapest {self.access.cli_name} attack)"
        )

    def evaluate(self, results: Mapping[str, Any]) -> Verdict:
        level = self.access.cli_name
        scanned = (results.get("access") or {}).get("level")
        if scanned != level:
            # in a scan at another level the cascade showed this level's
            # attacks only the samples stronger attacks missed, or none
            return self._verdict(False, f"query cost at {level} needs a scan at {level} access, not {scanned}")
        if (results.get("threat") or {}).get("target"):
            # reaching a chosen class costs more queries than any misclassification
            return self._verdict(False, "results are from a targeted audit")
        untrusted = _untrusted(results, "query counts")
        if untrusted:
            return self._verdict(False, untrusted)
        narrowed = _narrowed(results) if self.battery == "default" else None
        if narrowed:
            return self._verdict(False, narrowed)
        attacks = [a for a in results.get("attacks") or [] if a.get("access") == level]
        if not attacks:
            return self._verdict(False, f"no {level} attack was run")
        if all(attack.get("samples") == 0 for attack in attacks):
            return self._verdict(False, f"no {level} attack had a sample to attack")
        medians = [
            (attack["queries"]["median"], attack.get("name", "?"))
            for attack in attacks
            if (attack.get("queries") or {}).get("median") is not None
        ]
        if not medians:  # no success to measure: only the queries the samples withstood show a cost
            spent = [
                attack["queries"]["total"] / attack["samples"]
                for attack in attacks
                if attack.get("samples") and (attack.get("queries") or {}).get("total") is not None
            ]
            if not spent:
                return self._verdict(False, f"no {level} attack broke any sample, and none recorded its queries")
            most = max(spent)
            return self._verdict(
                most >= self.min, f"no {level} attack broke any sample; the most spent was {most:g} queries a sample"
            )
        cheapest, name = min(medians, key=lambda median_and_name: median_and_name[0])
        return self._verdict(cheapest >= self.min, f"{cheapest:g} queries ({name})")


@dataclass(frozen=True)
class NoChecksAt(Requirement):
    """``no_checks_at: LEVEL``: no sanity check at LEVEL or more severe."""

    KEY: ClassVar[str] = "no_checks_at"

    id: str
    level: str

    @classmethod
    def parse(cls, rid: str, value: Any, where: str, source: _Source) -> "NoChecksAt":
        return cls(rid, _choice(value, CHECK_LEVELS, where, source))

    def describe(self) -> str:
        return f"no checks at level {self.level} or above"

    def evaluate(self, results: Mapping[str, Any]) -> Verdict:
        threshold = CHECK_LEVELS.index(self.level)
        flagged = [
            check
            for check in results.get("checks") or []
            if _check_rank(check.get("level")) >= threshold
        ]
        if not flagged:
            return self._verdict(True, "none")
        listed = ", ".join(f"{c.get('id', '?')} ({c.get('level')})" for c in flagged)
        return self._verdict(False, f"{len(flagged)} at {self.level} or above: {listed}")


def _check_rank(level: Any) -> int:
    """Severity rank of a check level; an unknown level ranks as the most severe."""
    return CHECK_LEVELS.index(level) if level in CHECK_LEVELS else len(CHECK_LEVELS)


@dataclass(frozen=True)
class NoChecks(Requirement):
    """``no_checks: [ID, ...]``: none of the named checks was raised, at any level.

    A check's level says how bad it is in general; some warnings
    (``small-budget`` from 100 queries, ``transfer-only``) still say that the
    robust accuracy is overstated, and a gate must be able to refuse them
    without refusing every warning.
    """

    KEY: ClassVar[str] = "no_checks"

    id: str
    ids: tuple[str, ...]

    @classmethod
    def parse(cls, rid: str, value: Any, where: str, source: _Source) -> "NoChecks":
        if not isinstance(value, list) or not value:
            raise source.error(f"{where}: expected a non-empty list of check ids, got {_shown(value)}")
        for check_id in value:
            if not isinstance(check_id, str) or check_id not in CHECK_IDS:
                raise source.error(
                    f"{where}: unknown check id {_shown(check_id)}; known: {', '.join(sorted(CHECK_IDS))}"
                )
        return cls(rid, tuple(value))

    def describe(self) -> str:
        return f"no check among {', '.join(self.ids)}"

    def evaluate(self, results: Mapping[str, Any]) -> Verdict:
        flagged = [check for check in results.get("checks") or [] if check.get("id") in self.ids]
        if not flagged:
            return self._verdict(True, "none")
        listed = ", ".join(f"{c.get('id')} ({c.get('level')})" for c in flagged)
        return self._verdict(False, f"{len(flagged)} raised: {listed}")


REQUIREMENT_TYPES: dict[str, type[Requirement]] = {
    cls.KEY: cls for cls in (CleanAccuracy, RobustAccuracy, MedianQueries, NoChecksAt, NoChecks)
}


# --------------------------------------------------------------------------- #
# Policies
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Policy:
    """A named list of requirements loaded from a policy file."""

    name: str
    requirements: tuple[Requirement, ...]
    description: str | None = None
    path: Path | None = None

    def evaluate(self, results: Mapping[str, Any]) -> PolicyResult:
        """Judge a results dict against every requirement."""
        verdicts = tuple(requirement.evaluate(results) for requirement in self.requirements)
        return PolicyResult(self.name, all(v.passed for v in verdicts), verdicts, self.description)


def builtin_policies() -> list[str]:
    """Names of the policies shipped with auditor (``default``, ``strict``, ...)."""
    return sorted(path.stem for path in policies_dir().glob("*.yaml"))


def resolve_policy_path(path_or_name: str | Path) -> Path:
    """An existing file, or the shipped policy of that name; else AuditError."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if str(path_or_name) in builtin_policies():
        return policies_dir() / f"{path_or_name}.yaml"
    raise AuditError(
        f"policy {path_or_name}: no such file or built-in policy "
        f"(built-in: {', '.join(builtin_policies())})"
    )


def load_policy(path_or_name: str | Path) -> Policy:
    """Load and validate a policy file, or a built-in policy by name."""
    path = resolve_policy_path(path_or_name)
    source = _Source(path)
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # a SafeLoader
    except _LoneSurrogate as exc:
        raise source.error(
            f"holds text that is not valid Unicode (a lone surrogate, {_position(exc.mark)})"
        ) from None
    except yaml.YAMLError as exc:
        raise source.error(f"invalid YAML: {_yaml_problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise source.error(f"cannot read: {exc}") from exc
    except ValueError as exc:  # a value YAML cannot build: an integer of over 4300 digits, a 13th month
        raise source.error(f"invalid YAML value: {short_reason(exc)}") from exc
    except RecursionError as exc:
        raise source.error("invalid YAML: nested too deeply") from exc
    return _parse_policy(document, source)


_SURROGATE = re.compile("[\ud800-\udfff]")
"""Half of a UTF-16 pair: a double-quoted YAML escape (``"\\ud800"``) makes
one, and no text holding it can be printed or written as UTF-8."""


class _LoneSurrogate(Exception):
    """A policy string holds a surrogate (:data:`_SURROGATE`) at ``mark``."""

    def __init__(self, mark: yaml.Mark):
        super().__init__(mark)
        self.mark = mark


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one
    mapping is an error (SafeLoader keeps the last one silently), that
    aliases (``*name``) are refused: nested ones make a small file load as a
    huge document (a "billion laughs"), and a policy has no use for them,
    and that text holding a lone surrogate is refused: it would crash the
    terminal, the report and the JUnit writer after the whole scan."""

    def construct_scalar(self, node: yaml.ScalarNode) -> str:
        value = super().construct_scalar(node)
        if isinstance(value, str) and _SURROGATE.search(value):
            raise _LoneSurrogate(node.start_mark)
        return value

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            alias = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a policy", alias.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: {min: 0.5}` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {_shown(key)}", key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A one-line description of a YAML error, with its position if known."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"{problem} ({_position(mark)})"
    return " ".join(str(exc).split())


def _position(mark: yaml.Mark) -> str:
    """Where in the policy file ``mark`` is, as a reader counts (from 1)."""
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _parse_policy(document: Any, source: _Source) -> Policy:
    """Validate the loaded YAML document and build the policy."""
    if not isinstance(document, dict):
        raise source.error(
            f"expected a mapping with keys {', '.join(_TOP_LEVEL_KEYS)}, "
            f"got {type(document).__name__}"
        )
    _check_keys(document, _TOP_LEVEL_KEYS, ("policy", "requirements"), "top level", source)
    name = document["policy"]
    if not isinstance(name, str) or not name:
        raise source.error(f"policy: expected a non-empty string, got {_shown(name)}")
    description = document.get("description")
    if description is not None and not isinstance(description, str):
        raise source.error(f"description: expected a string, got {_shown(description)}")
    items = document["requirements"]
    if not isinstance(items, list) or not items:
        raise source.error("requirements: expected a non-empty list")
    return Policy(name, _parse_requirements(items, source), description, source.path)


def _parse_requirements(items: list[Any], source: _Source) -> tuple[Requirement, ...]:
    """Parse every item; explicit ids must be unique, derived ids are made so."""
    keys = [_requirement_key(item, number, source) for number, item in enumerate(items, 1)]
    explicit = [_explicit_id(item, number, source) for number, item in enumerate(items, 1)]
    taken: set[str] = set()
    for number, rid in enumerate(explicit, 1):
        if rid is None:
            continue
        if rid in taken:
            raise source.error(f"requirement {number}: duplicate id {_shown(rid)}")
        taken.add(rid)
    requirements = []
    for number, (item, key, rid) in enumerate(zip(items, keys, explicit), 1):
        if rid is None:
            rid = _unique_id(key, taken)
            taken.add(rid)
        where = f"requirement {number} ({key})"
        requirements.append(REQUIREMENT_TYPES[key].parse(rid, item[key], where, source))
    return tuple(requirements)


def _requirement_key(item: Any, number: int, source: _Source) -> str:
    """The single requirement key of a requirements item."""
    allowed = ", ".join(REQUIREMENT_TYPES)
    if not isinstance(item, dict):
        raise source.error(
            f"requirement {number}: expected a mapping with one of {allowed}, "
            f"got {type(item).__name__}"
        )
    keys = [key for key in item if key != "id"]
    unknown = [key for key in keys if key not in REQUIREMENT_TYPES]
    if unknown:
        raise source.error(
            f"requirement {number}: unknown key {_shown(unknown[0])}; allowed: {allowed}, id"
        )
    if len(keys) != 1:
        raise source.error(
            f"requirement {number}: expected exactly one of {allowed}, got {len(keys)}"
        )
    return keys[0]


def _explicit_id(item: Mapping[str, Any], number: int, source: _Source) -> str | None:
    """The item's ``id``, if given; it must be a non-empty string."""
    rid = item.get("id")
    if rid is not None and (not isinstance(rid, str) or not rid):
        raise source.error(f"requirement {number}: id: expected a non-empty string, got {_shown(rid)}")
    return rid


def _unique_id(key: str, taken: set[str]) -> str:
    """``key``, or ``key-2``, ``key-3``, ... whichever is free first."""
    candidate, suffix = key, 2
    while candidate in taken:
        candidate, suffix = f"{key}-{suffix}", suffix + 1
    return candidate


# --------------------------------------------------------------------------- #
# JUnit
# --------------------------------------------------------------------------- #


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""Characters XML 1.0 cannot hold, even escaped (most control characters)."""


def _xml(text: str) -> str:
    """``text`` with the characters XML 1.0 cannot hold replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", text)


def write_junit(policy_result: PolicyResult, path: str | Path) -> None:
    """Write the verdicts as a JUnit XML test suite, one test case per requirement.

    Names and messages come from the policy file and the results; a
    character XML cannot hold (a control character in a YAML string) is
    replaced, so that CI parsers can read the file.
    """
    failures = [v for v in policy_result.verdicts if not v.passed]
    suite = ET.Element(
        "testsuite",
        name=_xml(f"auditor policy: {policy_result.name}"),
        tests=str(len(policy_result.verdicts)),
        failures=str(len(failures)),
        errors="0",  # each requirement passed or failed: none erred or was skipped
        skipped="0",
    )
    for verdict in policy_result.verdicts:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=_xml(f"auditor.policy.{policy_result.name}"),
            name=_xml(verdict.id),
        )
        shown = _xml(f"required: {verdict.description}\nactual: {verdict.actual}\n")
        if not verdict.passed:
            failure = ET.SubElement(
                case, "failure", message=_xml(f"{verdict.description}; actual: {verdict.actual}")
            )
            failure.text = shown
        # after <failure>, as the Surefire and Jenkins schemas order them: a
        # passing case shows its threshold and the value that met it too
        ET.SubElement(case, "system-out").text = shown
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.indent(suite)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as out:
            ET.ElementTree(suite).write(out, encoding="utf-8", xml_declaration=True)
            out.write(b"\n")
        partial.replace(path)  # a reader never sees half a file
    finally:
        partial.unlink(missing_ok=True)
