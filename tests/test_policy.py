"""Policies: loading, validation, every requirement kind, JUnit output."""

from __future__ import annotations

import copy
import json
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from auditor.access import Access
from auditor.errors import AuditError
from auditor.policy import (
    CHECK_IDS,
    CleanAccuracy,
    MedianQueries,
    NoChecks,
    NoChecksAt,
    Policy,
    PolicyResult,
    RobustAccuracy,
    Verdict,
    builtin_policies,
    load_policy,
    write_junit,
)

RESULTS = {
    "schema": "auditor.results/1",
    "model": {"path": "m.onnx", "input_shape": [1, 28, 28]},
    "data": {"name": "mnist", "n": 100},
    "access": {"level": "soft-label", "reason": "onnx"},
    "threat": {"norm": "linf", "eps": [0.1, 0.2, 0.3], "budget": 2000},
    "clean_accuracy": 0.99,
    "robust_accuracy": {"0.1": 0.62, "0.2": 0.21, "0.3": 0.03},
    "attacks": [
        {"name": "square-linf", "access": "soft-label", "queries": {"median": 80.0}},
        {"name": "hsja-linf", "access": "hard-label", "queries": {"median": 1500.0}},
        {"name": "sign-opt-linf", "access": "hard-label", "queries": {"median": 1200.0}},
    ],
    "checks": [{"id": "non-monotone", "level": "warning", "message": "..."}],
}


def results(**changes):
    """A copy of RESULTS with top-level fields replaced."""
    out = copy.deepcopy(RESULTS)
    out.update(changes)
    return out


def write(tmp_path, text, name="policy.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(tmp_path, text) -> str:
    """The message of the AuditError raised loading ``text``; asserts it is one line."""
    path = write(tmp_path, text)
    with pytest.raises(AuditError) as info:
        load_policy(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# --------------------------------------------------------------------------- #
# clean_accuracy
# --------------------------------------------------------------------------- #


def test_clean_accuracy_pass_and_fail():
    verdict = CleanAccuracy("c", 0.98).evaluate(RESULTS)
    assert verdict == Verdict("c", "clean accuracy >= 0.98", True, "0.99")
    assert not CleanAccuracy("c", 0.995).evaluate(RESULTS).passed
    assert CleanAccuracy("c", 0.995).describe() == "clean accuracy >= 0.995"


def test_clean_accuracy_missing_fails_closed():
    verdict = CleanAccuracy("c", 0.5).evaluate(results(clean_accuracy=None))
    assert not verdict.passed
    assert "not recorded" in verdict.actual


# --------------------------------------------------------------------------- #
# robust_accuracy
# --------------------------------------------------------------------------- #


def test_robust_accuracy_pass_and_fail():
    assert RobustAccuracy("r", 0.6, 0.1).evaluate(RESULTS).passed
    verdict = RobustAccuracy("r", 0.8, 0.3, "linf", Access.WHITE_BOX).evaluate(
        results(access={"level": "white-box"})
    )
    assert not verdict.passed
    assert verdict.actual == "0.03 at ε=0.3"
    assert verdict.description == "robust accuracy >= 0.80 at linf ε=0.3 (white-box)"


@pytest.mark.parametrize(("eps", "actual"), [("min", "0.62 at ε=0.1"), ("max", "0.03 at ε=0.3")])
def test_robust_accuracy_eps_min_max(eps, actual):
    verdict = RobustAccuracy("r", 0.5, eps).evaluate(RESULTS)
    assert verdict.actual == actual
    assert verdict.passed == (eps == "min")
    assert f"ε={eps}" in verdict.description


@pytest.mark.parametrize(("eps", "actual"), [("min", "0.20 at ε=0.1"), ("max", "ε=0.3 was not evaluated")])
def test_eps_min_max_are_the_standard_radii_not_the_ones_the_scan_chose(eps, actual):
    """An extra --eps 0.001 made `default` pass a model 20 % robust at 0.1,
    and --eps 0.01 alone made `strict` pass the non-robust example CNN."""
    chosen = results(threat={"norm": "linf", "eps": [0.001, 0.01, 0.1]},
                     robust_accuracy={"0.001": 1.0, "0.01": 1.0, "0.1": 0.2})
    verdict = RobustAccuracy("r", 0.5, eps).evaluate(chosen)
    assert not verdict.passed and verdict.actual == actual


@pytest.mark.parametrize(
    ("shape", "norm", "eps", "key"),
    [
        ([1, 28, 28], "l2", "min", "1"),
        ([1, 32, 32], "linf", "max", "0.3"),
        ([3, 32, 32], "linf", "min", "0.00784314"),  # 2/255
        ([1, 64, 64], "linf", "max", "0.0313725"),  # 8/255
        ([3, 224, 224], "l2", "max", "1"),
    ],
)
def test_eps_min_max_follow_the_kind_of_image_and_the_norm(shape, norm, eps, key):
    scanned = results(model={"input_shape": shape}, threat={"norm": norm, "eps": [float(key)]},
                      robust_accuracy={key: 0.9})
    assert RobustAccuracy("r", 0.5, eps).evaluate(scanned).passed


NO_SHAPE = "the results record no image shape (C, H, W): ε=min has no standard value"


@pytest.mark.parametrize(
    ("changes", "actual"),
    [
        ({"model": {"path": "m.onnx"}}, NO_SHAPE),
        ({"model": {"input_shape": [28, 28]}}, NO_SHAPE),
        ({"threat": {"norm": "l1", "eps": [0.1]}}, "ε=min has no standard value for norm l1"),
    ],
)
def test_eps_min_fails_closed_without_a_shape_and_norm_to_resolve_it(changes, actual):
    verdict = RobustAccuracy("r", 0.5, "min").evaluate(results(**changes))
    assert not verdict.passed and verdict.actual == actual


def test_robust_accuracy_takes_and_shows_eps_as_a_fraction_of_255(tmp_path):
    policy = load_policy(write(tmp_path, """\
        policy: p
        requirements:
          - robust_accuracy: {min: 0.5, eps: 8/255}
        """))
    (requirement,) = policy.requirements
    verdict = requirement.evaluate(results(threat={"norm": "linf", "eps": [8 / 255]}, robust_accuracy={"0.0313725": 0.6}))
    assert verdict.passed and verdict.actual == "0.60 at ε=8/255"
    assert "eps: expected a number >= 0, 'min' or 'max', got '8/0'" in load_error(tmp_path, """\
        policy: p
        requirements:
          - robust_accuracy: {min: 0.5, eps: 8/0}
        """)
    assert "got '-8/255'" in load_error(tmp_path, """\
        policy: p
        requirements:
          - robust_accuracy: {min: 0.5, eps: -8/255}
        """)


def test_a_threshold_is_shown_with_every_digit_two_decimals_would_round():
    """0.9 against a minimum of 0.9000001 fails; the line must not read "0.90 >= 0.9"."""
    verdict = CleanAccuracy("c", 0.9000001).evaluate(results(clean_accuracy=0.9))
    assert not verdict.passed
    assert (verdict.description, verdict.actual) == ("clean accuracy >= 0.9000001", "0.90")


def test_robust_accuracy_eps_not_evaluated_fails():
    verdict = RobustAccuracy("r", 0.0, 0.25).evaluate(RESULTS)
    assert not verdict.passed
    assert verdict.actual == "ε=0.25 was not evaluated"


def test_robust_accuracy_no_eps_evaluated_fails():
    threat = {"norm": "linf", "eps": [], "budget": 2000}
    verdict = RobustAccuracy("r", 0.0, "max").evaluate(results(threat=threat, robust_accuracy={}))
    assert not verdict.passed


def test_robust_accuracy_norm_mismatch_fails():
    verdict = RobustAccuracy("r", 0.0, 0.1, norm="l2").evaluate(RESULTS)
    assert not verdict.passed
    assert verdict.actual == "results are for linf"


@pytest.mark.parametrize(
    ("required", "passed"),
    [
        (Access.NONE, True),
        (Access.HARD_LABEL, True),
        (Access.SOFT_LABEL, True),  # same level as the results
        (Access.WHITE_BOX, False),
    ],
)
def test_robust_accuracy_access_ordering(required, passed):
    verdict = RobustAccuracy("r", 0.5, 0.1, access=required).evaluate(RESULTS)
    assert verdict.passed is passed
    if not passed:
        assert verdict.actual == (
            "results at soft-label access cannot show robustness against white-box"
        )


# --------------------------------------------------------------------------- #
# median_queries
# --------------------------------------------------------------------------- #


HARD_LABEL = results(access={"level": "hard-label", "reason": "asked"})


def test_median_queries_takes_the_cheapest_attack_of_that_level():
    verdict = MedianQueries("q", 1000, Access.HARD_LABEL).evaluate(HARD_LABEL)
    assert verdict.passed
    assert verdict.actual == "1200 queries (sign-opt-linf)"
    assert not MedianQueries("q", 1300, Access.HARD_LABEL).evaluate(HARD_LABEL).passed


def test_median_queries_uses_exactly_that_level():
    # The soft-label attack needs only 80 queries, but is not a hard-label attack.
    soft = results(attacks=RESULTS["attacks"][:1])
    assert MedianQueries("q", 1000, Access.HARD_LABEL).evaluate(HARD_LABEL).passed
    assert not MedianQueries("q", 1000, Access.SOFT_LABEL).evaluate(soft).passed


def test_median_queries_needs_a_scan_at_that_level():
    """In a soft-label scan the hard-label attacks saw only what Square missed."""
    verdict = MedianQueries("q", 1000, Access.HARD_LABEL).evaluate(RESULTS)
    assert not verdict.passed
    assert verdict.actual == "query cost at hard-label needs a scan at hard-label access, not soft-label"


def test_median_queries_nothing_broken_passes_only_if_the_samples_withstood_enough_queries():
    """Nothing broken shows a cost only as far as the queries spent on each
    sample: 2,000 a sample shows >= 1,000, not >= 10^9; 16 a sample (a
    random-noise baseline alone, or --budget 16) shows nothing, whatever
    the scan's budget (the scan's budget used to pass any bar)."""
    attacks = [
        {"name": "hsja-linf", "access": "hard-label", "samples": 8, "queries": {"median": None, "total": 16000}},
        {"name": "random-noise-linf", "access": "hard-label", "samples": 8, "queries": {"median": None, "total": 128}},
    ]
    unbroken = results(access=HARD_LABEL["access"], attacks=attacks)
    verdict = MedianQueries("q", 1000, Access.HARD_LABEL).evaluate(unbroken)
    assert verdict.passed
    assert verdict.actual == "no hard-label attack broke any sample; the most spent was 2000 queries a sample"
    assert not MedianQueries("q", 10**9, Access.HARD_LABEL).evaluate(unbroken).passed
    verdict = MedianQueries("q", 1000, Access.HARD_LABEL).evaluate(results(access=HARD_LABEL["access"],
                                                                           attacks=attacks[1:]))
    assert not verdict.passed
    assert verdict.actual == "no hard-label attack broke any sample; the most spent was 16 queries a sample"


def test_median_queries_fails_when_its_attacks_had_no_sample():
    """Every sample misclassified before any attack: nothing was measured."""
    attacks = [{**attack, "samples": 0, "queries": {"median": None}} for attack in RESULTS["attacks"]]
    verdict = MedianQueries("q", 1000, Access.HARD_LABEL).evaluate(results(access=HARD_LABEL["access"],
                                                                           attacks=attacks))
    assert not verdict.passed and verdict.actual == "no hard-label attack had a sample to attack"


def test_median_queries_no_attack_of_that_level_fails():
    white_box = results(access={"level": "white-box", "reason": "asked"})
    verdict = MedianQueries("q", 0, Access.WHITE_BOX).evaluate(white_box)
    assert not verdict.passed
    assert verdict.actual == "no white-box attack was run"


def test_robust_accuracy_refuses_a_targeted_audit():
    targeted = results(threat={**RESULTS["threat"], "target": {"mode": "random"}})
    verdict = RobustAccuracy("r", 0.5, "min").evaluate(targeted)
    assert not verdict.passed and verdict.actual == "results are from a targeted audit"
    assert RobustAccuracy("r", 0.5, "min").evaluate(RESULTS).passed


def test_median_queries_refuses_a_targeted_audit():
    """Reaching a chosen class costs more queries than any misclassification:
    a targeted scan overstates the untargeted attacker's cost."""
    targeted = results(access=HARD_LABEL["access"],
                       threat={**RESULTS["threat"], "target": {"mode": "random"}})
    verdict = MedianQueries("q", 1000, Access.HARD_LABEL).evaluate(targeted)
    assert not verdict.passed and verdict.actual == "results are from a targeted audit"


@pytest.mark.parametrize(
    ("raised", "ids"),
    [
        ([{"id": "small-budget", "level": "error"}], "an error-level check (small-budget)"),
        ([{"id": "nan-gradients", "level": "error"}, {"id": "nan-gradients", "level": "error"}],
         "an error-level check (nan-gradients)"),
        ([{"id": "small-budget", "level": "error"}, {"id": "softmax-outputs", "level": "warning"},
          {"id": "odd", "level": "fatal"}], "error-level checks (small-budget, odd)"),
    ],
)
def test_robustness_and_cost_fail_on_results_their_checks_call_untrustworthy(raised, ids):
    """A pinned {eps: 0.1, norm: linf, access: hard-label} passed a --budget 1
    scan at 100 % that the scan itself flagged small-budget at level error."""
    flagged = results(access=HARD_LABEL["access"], checks=raised)
    verdict = RobustAccuracy("r", 0.5, 0.1, "linf", Access.HARD_LABEL, battery="any").evaluate(flagged)
    assert not verdict.passed
    assert verdict.actual == f"the results carry {ids}: their robust accuracy cannot be trusted"
    verdict = MedianQueries("q", 1000, Access.HARD_LABEL, battery="any").evaluate(flagged)
    assert not verdict.passed
    assert verdict.actual == f"the results carry {ids}: their query counts cannot be trusted"
    warned = results(access=HARD_LABEL["access"], checks=[{"id": "small-budget", "level": "warning"}])
    assert RobustAccuracy("r", 0.5, 0.1, "linf", Access.HARD_LABEL).evaluate(warned).passed
    assert MedianQueries("q", 1000, Access.HARD_LABEL).evaluate(warned).passed


# --------------------------------------------------------------------------- #
# no_checks_at
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("level", "passed"), [("info", False), ("warning", False), ("error", True)]
)
def test_no_checks_at_levels(level, passed):
    verdict = NoChecksAt("n", level).evaluate(RESULTS)
    assert verdict.passed is passed
    if not passed:
        assert "non-monotone" in verdict.actual


def test_no_checks_at_passes_without_checks():
    assert NoChecksAt("n", "info").evaluate(results(checks=[])).passed


# --------------------------------------------------------------------------- #
# no_checks
# --------------------------------------------------------------------------- #


def test_no_checks_fails_on_a_named_check_at_any_level(tmp_path):
    policy = load_policy(write(tmp_path, """\
        policy: p
        requirements:
          - no_checks: [small-budget, non-monotone]
          - no_checks: [transfer-only]
        """))
    named, other = policy.requirements
    assert named == NoChecks("no_checks", ("small-budget", "non-monotone"))
    assert named.describe() == "no check among small-budget, non-monotone"
    verdict = named.evaluate(RESULTS)
    assert not verdict.passed and verdict.actual == "1 raised: non-monotone (warning)"
    assert other.id == "no_checks-2" and other.evaluate(RESULTS) == Verdict(
        "no_checks-2", "no check among transfer-only", True, "none"
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[small-budgit]", "requirement 1 (no_checks): unknown check id 'small-budgit'; "
                           "known: access-limited, attack-skipped, "),
        ("[[small-budget]]", "unknown check id ['small-budget']; known: "),
        ("[]", "requirement 1 (no_checks): expected a non-empty list of check ids, got []"),
        ("small-budget", "expected a non-empty list of check ids, got 'small-budget'"),
    ],
)
def test_no_checks_refuses_ids_no_check_has(tmp_path, value, problem):
    """A misspelt id is never raised: the requirement would pass anything."""
    assert problem in load_error(tmp_path, f"policy: p\nrequirements:\n  - no_checks: {value}\n")


def test_no_checks_knows_every_check_id_of_auditor_checks():
    source = (Path(__file__).parent.parent / "auditor" / "checks.py").read_text()
    assert CHECK_IDS == set(re.findall(r'^[A-Z_]+ = "([a-z-]+)"$', source, re.MULTILINE))


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #

FULL_POLICY = """\
    policy: full
    description: every kind
    requirements:
      - clean_accuracy: {min: 0.98}
      - robust_accuracy: {min: 0.8, eps: 0.3, norm: linf, access: white-box}
      - id: cheap-hard-label
        median_queries: {min: 1000, access: hard-label}
      - no_checks_at: warning
      - robust_accuracy: {min: 0.5, eps: min}
"""


def test_load_full_policy(tmp_path):
    policy = load_policy(write(tmp_path, FULL_POLICY))
    assert policy.name == "full"
    assert policy.description == "every kind"
    assert [r.id for r in policy.requirements] == [
        "clean_accuracy",
        "robust_accuracy",
        "cheap-hard-label",
        "no_checks_at",
        "robust_accuracy-2",
    ]
    assert policy.requirements[1] == RobustAccuracy(
        "robust_accuracy", 0.8, 0.3, "linf", Access.WHITE_BOX
    )
    result = policy.evaluate(HARD_LABEL)
    assert [v.passed for v in result.verdicts] == [True, False, True, False, True]
    assert not result.passed


def test_policy_passes_when_all_requirements_pass():
    policy = Policy("ok", (CleanAccuracy("c", 0.9), NoChecksAt("n", "error")))
    assert policy.evaluate(RESULTS).passed


def test_derived_ids_avoid_explicit_ones(tmp_path):
    policy = load_policy(
        write(
            tmp_path,
            """\
            policy: p
            requirements:
              - clean_accuracy: {min: 0.5}
              - id: clean_accuracy-2
                no_checks_at: error
              - clean_accuracy: {min: 0.6}
            """,
        )
    )
    assert [r.id for r in policy.requirements] == [
        "clean_accuracy",
        "clean_accuracy-2",
        "clean_accuracy-3",
    ]


def test_shipped_policies_load():
    assert {"default", "strict"} <= set(builtin_policies())
    default = load_policy("default")
    strict = load_policy("strict")
    assert default.name == "default"
    assert strict.name == "strict"
    assert [type(r) for r in strict.requirements] == [
        CleanAccuracy,
        RobustAccuracy,
        MedianQueries,
        NoChecksAt,
    ]


def test_strict_fails_a_non_robust_model_and_default_judges_it():
    assert not load_policy("strict").evaluate(RESULTS).passed
    assert load_policy("default").evaluate(RESULTS).passed


def test_default_refuses_every_check_that_calls_robust_accuracy_overstated():
    """A hard-label --budget 100 scan passed `default` although its
    small-budget warning said robust accuracy was overstated."""
    from auditor.report.build import OVERSTATING_CHECKS

    (cited,) = [r for r in load_policy("default").requirements if isinstance(r, NoChecks)]
    assert set(cited.ids) == OVERSTATING_CHECKS
    for check_id in ("small-budget", "transfer-only"):
        warned = results(checks=[{"id": check_id, "level": "warning", "message": "..."}])
        verdict = load_policy("default").evaluate(warned)
        assert not verdict.passed
        assert [v.actual for v in verdict.verdicts if not v.passed] == [f"1 raised: {check_id} (warning)"]


def test_existing_path_wins_over_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "policy: local\nrequirements: [{no_checks_at: error}]\n", name="strict")
    assert load_policy("strict").name == "local"


def test_missing_policy_names_builtins(tmp_path):
    with pytest.raises(AuditError, match="no such file or built-in policy.*strict"):
        load_policy(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("policy: p\nrequirements: [{clean_accuracy: {min: 0.5}}]\nextra: 1\n",
         "unknown key 'extra'; allowed: policy, description, requirements"),
        ("policy: p\nrequirements: [{clean_acc: {min: 0.5}}]\n",
         "unknown key 'clean_acc'; allowed: clean_accuracy, robust_accuracy,"),
        ("policy: p\nrequirements: [{robust_accuracy: {min: 0.5, eps: 0.3, epsilon: 1}}]\n",
         "unknown key 'epsilon'; allowed: min, eps, norm, access"),
        ("policy: p\nrequirements: [{clean_accuracy: {min: 1.5}}]\n",
         "min: expected a number in [0, 1], got 1.5"),
        ("policy: p\nrequirements: [{clean_accuracy: {min: 'high'}}]\n",
         "min: expected a number in [0, 1], got 'high'"),
        ("policy: p\nrequirements: [{clean_accuracy: {min: true}}]\n",
         "min: expected a number in [0, 1], got True"),
        ("policy: p\nrequirements: [{clean_accuracy: {}}]\n", "missing required key 'min'"),
        ("policy: p\nrequirements: [{median_queries: {min: 10.5, access: hard-label}}]\n",
         "min: expected an integer >= 0, got 10.5"),
        ("policy: p\nrequirements: [{median_queries: {min: -1, access: hard-label}}]\n",
         "min: expected an integer >= 0, got -1"),
        ("policy: p\nrequirements: [{median_queries: {min: 1}}]\n",
         "missing required key 'access'"),
        ("policy: p\nrequirements: [{robust_accuracy: {min: 0.5, eps: biggest}}]\n",
         "eps: expected a number >= 0, 'min' or 'max', got 'biggest'"),
        ("policy: p\nrequirements: [{robust_accuracy: {min: 0.5, eps: 0.1, norm: l1}}]\n",
         "norm: expected one of linf, l2, got 'l1'"),
        ("policy: p\nrequirements: [{robust_accuracy: {min: 0.5, eps: 0.1, access: root}}]\n",
         "access: expected one of none, hard-label, soft-label, white-box, got 'root'"),
        ("policy: p\nrequirements: [{no_checks_at: fatal}]\n",
         "expected one of info, warning, error, got 'fatal'"),
        ("policy: p\nrequirements: [{clean_accuracy: {min: 0.5}, no_checks_at: error}]\n",
         "expected exactly one of"),
        ("policy: p\nrequirements: [{id: lonely}]\n", "expected exactly one of"),
        ("policy: p\nrequirements: [{id: 3, no_checks_at: error}]\n",
         "id: expected a non-empty string"),
        ("policy: p\nrequirements: [{id: a, no_checks_at: error}, {id: a, no_checks_at: info}]\n",
         "duplicate id 'a'"),
        ("policy: p\nrequirements: [clean_accuracy]\n", "expected a mapping"),
        ("policy: p\nrequirements: []\n", "requirements: expected a non-empty list"),
        ("policy: p\n", "missing required key 'requirements'"),
        ("requirements: [{no_checks_at: error}]\n", "missing required key 'policy'"),
        ("policy: [p]\nrequirements: [{no_checks_at: error}]\n",
         "policy: expected a non-empty string"),
        ("- just\n- a list\n", "expected a mapping"),
        ("", "expected a mapping"),
        ("policy: p\nrequirements: [{clean_accuracy: {min: 0.5}\n", "invalid YAML"),
        ("policy: p\n  bad: indent\nrequirements: x\n", "invalid YAML"),
        ("policy: !!python/object:os.system ls\nrequirements: []\n", "invalid YAML"),
        ("policy: p\nrequirements:\n  - clean_accuracy: {min: 0.5, min: 0.99}\n",
         "invalid YAML: duplicate key 'min' (line 3, column 32)"),
        ("policy: p\npolicy: q\nrequirements: [{no_checks_at: error}]\n",
         "invalid YAML: duplicate key 'policy' (line 2, column 1)"),
        ("policy: p\nrequirements:\n  - id: a\n    id: b\n    no_checks_at: error\n",
         "invalid YAML: duplicate key 'id' (line 4, column 5)"),
        ("policy: p\nrequirements:\n  - clean_accuracy: &base {min: 0.5}\n  - clean_accuracy: *base\n",
         "invalid YAML: aliases (*name) are not allowed in a policy (line 4, column 21)"),
        ("policy: p\nrequirements:\n  - median_queries: {min: " + "9" * 5000 + ", access: hard-label}\n",
         "invalid YAML value: Exceeds the limit (4300 digits) for integer string conversion"),
        ("policy: " + "[" * 10_000 + "]" * 10_000 + "\nrequirements: [{no_checks_at: error}]\n",
         "invalid YAML: nested too deeply"),
    ],
)
def test_bad_policies_raise_one_line_audit_error(tmp_path, text, problem):
    assert problem in load_error(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('policy: "x \\ud800"\nrequirements: [{no_checks_at: error}]\n', "line 1, column 9"),
        ('policy: p\nrequirements:\n  - id: "\\udfff"\n    no_checks_at: error\n', "line 3, column 9"),
        ('policy: p\n"\\ud83d\\ude00": 1\nrequirements: [{no_checks_at: error}]\n', "line 2, column 1"),
    ],
)
def test_a_lone_surrogate_is_refused_when_the_policy_loads(tmp_path, text, where):
    """Such text cannot be printed or written as UTF-8: it crashed `check`
    at its first line of output, and `scan` after the whole scan."""
    assert load_error(tmp_path, text).endswith(
        f": holds text that is not valid Unicode (a lone surrogate, {where})"
    )


def test_merge_keys_may_override_what_they_merge(tmp_path):
    path = write(tmp_path, """\
        policy: p
        requirements:
          - clean_accuracy: {min: 0.5}
          - id: stricter
            clean_accuracy: {<<: {min: 0.5}, min: 0.9}
        """)
    assert [r.min for r in load_policy(path).requirements] == [0.5, 0.9]


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Nested aliases make a few hundred bytes load as millions of strings,
    which an error message quoting the value would spell out in full."""
    bomb = '&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'
    for level in range(1, 6):
        bomb = f"&a{level} [{bomb}, " + ", ".join([f"*a{level - 1}"] * 8) + "]"
    message = load_error(tmp_path, f"policy: {bomb}\nrequirements: [{{no_checks_at: error}}]\n")
    assert "invalid YAML: aliases (*name) are not allowed in a policy (line 1, column " in message
    assert len(message) < 200


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("policy: [{long}]\nrequirements: [{{no_checks_at: error}}]\n",
         "policy: expected a non-empty string, got ['xxx"),
        ("policy: p\nrequirements: [{{clean_accuracy: {{min: {long}}}}}]\n",
         "min: expected a number in [0, 1], got 'xxx"),
        ("policy: p\nrequirements: [{{no_checks_at: {long}}}]\n",
         "expected one of info, warning, error, got 'xxx"),
    ],
)
def test_a_long_wrong_value_is_cut_short_in_the_message(tmp_path, text, problem):
    message = load_error(tmp_path, text.format(long="x" * 100_000))
    assert problem in message
    shown = message.rsplit(", got ", 1)[1]
    assert len(shown) == 60 and shown.endswith("x…")


def test_error_names_the_requirement(tmp_path):
    message = load_error(
        tmp_path,
        """\
        policy: p
        requirements:
          - clean_accuracy: {min: 0.5}
          - robust_accuracy: {min: 2, eps: max}
        """,
    )
    assert "requirement 2 (robust_accuracy).min: expected a number in [0, 1], got 2" in message


# --------------------------------------------------------------------------- #
# Output: to_dict and JUnit
# --------------------------------------------------------------------------- #


def test_to_dict_round_trips_through_json(tmp_path):
    result = load_policy(write(tmp_path, FULL_POLICY)).evaluate(RESULTS)
    data = json.loads(json.dumps(result.to_dict()))
    assert data == result.to_dict()
    assert set(data) == {"name", "description", "passed", "requirements"}
    assert data["description"] == load_policy(write(tmp_path, FULL_POLICY)).description
    assert data["passed"] is False
    for item, verdict in zip(data["requirements"], result.verdicts, strict=True):
        assert set(item) == {"id", "description", "passed", "actual"}
        assert Verdict(**item) == verdict


def test_junit_has_one_testcase_per_requirement(tmp_path):
    result = load_policy(write(tmp_path, FULL_POLICY)).evaluate(HARD_LABEL)
    path = tmp_path / "out" / "junit.xml"
    write_junit(result, path)
    suite = ET.parse(path).getroot()
    assert suite.tag == "testsuite"
    assert suite.get("name") == "auditor policy: full"
    assert suite.get("tests") == "5"
    assert suite.get("failures") == "2"
    assert (suite.get("errors"), suite.get("skipped")) == ("0", "0")
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == [v.id for v in result.verdicts]
    for case, verdict in zip(cases, result.verdicts, strict=True):
        assert case.get("classname") == "auditor.policy.full"
        failures = case.findall("failure")
        assert len(failures) == (0 if verdict.passed else 1)
        if failures:
            message = failures[0].get("message")
            assert verdict.description in message
            assert verdict.actual in message


def test_junit_shows_threshold_and_actual_of_passing_cases_too(tmp_path):
    """A passing case showed neither what it required nor what it found."""
    verdicts = (Verdict("c", "clean accuracy >= 0.50", True, "0.99"),
                Verdict("r", "robust accuracy >= 0.50 at ε=min", False, "0.20 at ε=0.1"))
    write_junit(PolicyResult("p", False, verdicts), tmp_path / "j.xml")
    passing, failing = ET.parse(tmp_path / "j.xml").getroot().findall("testcase")
    assert [child.tag for child in passing] == ["system-out"]
    assert passing.find("system-out").text == "required: clean accuracy >= 0.50\nactual: 0.99\n"
    assert [child.tag for child in failing] == ["failure", "system-out"]
    assert failing.find("system-out").text == (
        "required: robust accuracy >= 0.50 at ε=min\nactual: 0.20 at ε=0.1\n"
    )


def test_junit_escapes_special_characters(tmp_path):
    verdict = Verdict('a<b>&"c"', "x < y & z", False, "'quoted' <tag>\nsecond line")
    write_junit(PolicyResult("p&q", False, (verdict,)), tmp_path / "j.xml")
    suite = ET.parse(tmp_path / "j.xml").getroot()
    case = suite.find("testcase")
    assert case.get("name") == 'a<b>&"c"'
    assert suite.get("name") == "auditor policy: p&q"
    assert case.find("failure").get("message") == (
        "x < y & z; actual: 'quoted' <tag>\nsecond line"
    )


# --------------------------------------------------------------------------- #
# narrowed batteries
# --------------------------------------------------------------------------- #


NARROWED = results(
    access=HARD_LABEL["access"],
    checks=[{"id": "custom-battery", "level": "warning", "message": "--attacks left out 4 attacks ..."}],
)


def test_a_narrowed_battery_passes_no_robustness_or_cost_bar_unless_the_policy_accepts_it():
    """`--attacks random-noise` left the example CNN 100 % robust where the
    full battery finds 12.5 %, and the default policy passed it: a battery
    that left out default attacks shows neither robustness nor query cost."""
    reason = "the scan left out default attacks (custom-battery); battery: any accepts it"
    for requirement in (RobustAccuracy("r", 0.5, 0.1), MedianQueries("q", 1000, Access.HARD_LABEL)):
        verdict = requirement.evaluate(NARROWED)
        assert not verdict.passed and verdict.actual == reason
        assert requirement.evaluate(results(access=HARD_LABEL["access"])).passed
    assert RobustAccuracy("r", 0.5, 0.1, battery="any").evaluate(NARROWED).passed
    assert MedianQueries("q", 1000, Access.HARD_LABEL, battery="any").evaluate(NARROWED).passed


def test_battery_option_loads_and_is_checked(tmp_path):
    policy = load_policy(write(tmp_path, """
        policy: p
        requirements:
          - robust_accuracy: {min: 0.5, eps: 0.1, battery: any}
          - median_queries: {min: 10, access: hard-label, battery: default}
    """))
    assert [r.battery for r in policy.requirements] == ["any", "default"]
    message = load_error(tmp_path, """
        policy: p
        requirements:
          - robust_accuracy: {min: 0.5, eps: 0.1, battery: some}
    """)
    assert message.endswith("requirement 1 (robust_accuracy).battery: expected one of default, any, got 'some'")


def test_junit_is_well_formed_whatever_characters_the_names_hold(tmp_path):
    """A YAML string may hold control characters that XML 1.0 cannot."""
    verdict = Verdict("id\x07", "clean accuracy >= 0.5", False, "0.1\x1b[31m")
    write_junit(PolicyResult("p\x00q", False, (verdict,)), tmp_path / "j.xml")
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert suite.get("name") == "auditor policy: p\ufffdq"
    assert suite.find("testcase").get("name") == "id\ufffd"
    assert (tmp_path / "j.xml").read_text(encoding="utf-8").endswith("</testsuite>\n")


def test_an_exponent_yaml_read_as_text_gets_a_hint(tmp_path):
    """YAML 1.1 reads 5e-1 (no dot) as the string '5e-1'."""
    message = load_error(tmp_path, """
        policy: p
        requirements:
          - robust_accuracy: {min: 5e-1, eps: 1e-1}
    """)
    assert message.endswith("min: expected a number in [0, 1], got '5e-1' "
                            "(text to YAML: write a number with a dot, e.g. 1.0e-1)")
    message = load_error(tmp_path, """
        policy: p
        requirements:
          - robust_accuracy: {min: 0.5, eps: 1e-1}
    """)
    assert "got '1e-1' (text to YAML: write a number with a dot" in message
    assert load_policy(write(tmp_path, """
        policy: p
        requirements:
          - robust_accuracy: {min: 5.0e-1, eps: 1.0e-1}
    """)).requirements[0].min == 0.5
