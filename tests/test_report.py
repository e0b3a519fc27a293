"""The HTML/PDF report: built from results.json alone, escaped, deterministic, atomic."""

from __future__ import annotations

import copy
import re
import signal
import subprocess
import sys
from pathlib import Path

import pypdf
import pytest
import weasyprint
from markupsafe import escape
from PIL import Image

from auditor.cli import _echo_summary
from auditor.errors import AuditError
from auditor.report.build import build_view, check_explanations
from auditor.report.render import render_html, write_pdf, write_report
from auditor.report.schema import validate_results


@pytest.fixture
def results() -> dict:
    """A complete ``auditor.results/1`` dict with a failed policy. Each
    attack's own robust accuracy is 1 at every ε, so that a test may set the
    worst case over them (``robust_accuracy``) to anything."""
    return {
        "schema": "auditor.results/1",
        "auditor_version": "0.1.0",
        "seed": 0,
        "started": "2026-11-24T10:00:00+00:00",
        "seconds": 42.1,
        "model": {
            "path": "examples/mnist_cnn.onnx",
            "format": "onnx",
            "sha256": "ab12" * 16,
            "input_shape": [1, 28, 28],
            "num_classes": 10,
        },
        "data": {"name": "mnist", "n": 100, "sha256": "cd34" * 16},
        "access": {"level": "hard-label", "reason": "requested with --access hard-label"},
        "threat": {"norm": "linf", "eps": [0.1, 0.2, 0.3], "budget": 2000},
        "clean_accuracy": 0.99,
        "robust_accuracy": {"0.1": 0.62, "0.2": 0.21, "0.3": 0.03},
        "attacks": [
            {
                "name": "square-linf",
                "access": "soft-label",
                "kind": "fixed-eps",
                "norm": "linf",
                "params": {"norm": "linf", "p_init": 0.8},
                "paper": "Andriushchenko et al., Square Attack, ECCV 2020",
                "samples": 99,
                "robust_accuracy": {"0.1": 1.0, "0.2": 1.0, "0.3": 1.0},
                "success_rate": 0.95,
                "queries": {"mean": 123.4, "median": 80.0, "p90": 300.0, "max": 1900,
                            "budget": 2000, "total": 45000},
                "runs": [
                    {"eps": 0.3, "samples": 99, "broken": 94, "queries": 45000,
                     "queries_to_success": {"mean": 117.5, "median": 75.0, "p90": 280.0, "max": 1900,
                                            "budget": 2000, "total": 45000, "measure": "to-success"},
                     "success_curve": {"queries": [1, 10, 100, 1000, 2000],
                                       "success_rate": [0.1, 0.3, 0.6, 0.9, 0.949495]}},
                ],
                "seconds": 3.2,
            },
            {
                "name": "sign-opt-l2",
                "access": "hard-label",
                "kind": "min-norm",
                "norm": "l2",
                "params": {"k": 200},
                "paper": "Cheng et al., Sign-OPT, ICLR 2020",
                "samples": 5,
                "robust_accuracy": {"0.1": 1.0, "0.2": 1.0, "0.3": 1.0},
                "success_rate": 0.4,
                "queries": {"mean": None, "median": None, "p90": None, "max": None,
                            "budget": 2000, "total": 10000},
                "runs": [
                    {"eps": None, "samples": 5, "broken": 2, "queries": 10000,
                     "distortion_at_queries": {"queries": [500, 1000, 2000], "median": [None, 3.1, 2.25],
                                               "mean_found": [4.0, 3.0, 2.5], "found": [2, 3, 4]}},
                ],
                "seconds": 2.0,
            },
        ],
        "samples": [
            {"index": 17, "label": 3, "clean_pred": 3, "distortion": 0.21, "broken_by": "square-linf",
             "queries": 340},
            {"index": 18, "label": 1, "clean_pred": 7, "distortion": 0.0, "broken_by": "clean", "queries": 0},
            {"index": 19, "label": 2, "clean_pred": 2, "distortion": None, "broken_by": None,
             "queries": 2000},
        ],
        "checks": [
            {"id": "softmax-outputs", "level": "warning",
             "message": "model outputs look like probabilities"},
        ],
        "manifest": {
            "python": "3.11.7",
            "torch": "2.14.1",
            "onnxruntime": "1.32.0",
            "platform": "Linux-6.1-x86_64",
            "command": "auditor scan examples/mnist_cnn.onnx --access hard-label --policy strict",
            "device": "cpu",
        },
        "policy": {
            "name": "strict",
            "passed": False,
            "requirements": [
                {"id": "clean-accuracy", "description": "clean accuracy >= 0.98",
                 "passed": True, "actual": "0.99"},
                {"id": "robust-accuracy", "description": "robust accuracy >= 0.80 at linf eps=0.3",
                 "passed": False, "actual": "0.03"},
            ],
        },
    }


def _pdf_text(path) -> str:
    """The PDF's text with runs of whitespace (line breaks included) as single spaces."""
    return " ".join(" ".join(page.extract_text() for page in pypdf.PdfReader(path).pages).split())


def test_pdf_shows_verdict_and_robust_accuracy(results, tmp_path):
    html_path, pdf_path = write_report(results, tmp_path / "out")

    assert html_path == tmp_path / "out" / "report.html"
    text = _pdf_text(pdf_path)
    assert "FAIL" in text
    summary = "Robust accuracy 3.0 % at ε=0.3 (L∞) against hard-label attacks; clean accuracy 99.0 %"
    assert summary in text
    for value in ("62.0 %", "21.0 %", "3.0 %", "38 of 100", "97 of 100"):
        assert value in text
    assert "square-linf" in text and "1,900" in text
    assert "softmax-outputs" in text
    assert "page 1 of" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.pdf"]


def test_view_formats_sections(results):
    view = build_view(results)

    assert (view.verdict.status, view.verdict.text, view.verdict.policy) == ("fail", "FAIL", "strict")
    assert [(row.eps, row.robust_accuracy, row.broken) for row in view.robust_rows] == [
        ("0.1", "62.0 %", "38 of 100"),
        ("0.2", "21.0 %", "79 of 100"),
        ("0.3", "3.0 %", "97 of 100"),
    ]
    square, sign_opt = view.attacks
    queries = (square.queries_mean, square.queries_median, square.queries_p90, square.queries_max)
    assert queries == ("123.4", "80", "300", "1,900") and square.budget == "2,000"
    assert square.params == "norm=linf, p_init=0.8"
    assert sign_opt.queries_median == "—" and sign_opt.success_rate == "40.0 %"
    distortion = view.distortion
    assert (distortion.median, distortion.broken, distortion.not_broken) == ("0.21", "1 sample", "1 sample")
    assert view.chart_svg.startswith("<svg")


def test_radii_of_whole_grey_levels_read_as_fractions(results):
    results["threat"]["eps"] = [2 / 255, 8 / 255]
    results["robust_accuracy"] = {"0.00784314": 0.5, "0.0313725": 0.25}
    results["attacks"][0]["runs"][0]["eps"] = 8 / 255
    view = build_view(results)
    assert [row.eps for row in view.robust_rows] == ["2/255", "8/255"]
    assert "at ε=8/255 (L∞)" in view.verdict.summary
    robust_notes = {headline.label: headline.notes for headline in view.headlines}["Robust accuracy"]
    assert robust_notes == ("at ε=8/255 (L∞)", "95 % CI 17.5–34.4 %")
    assert {field.label: field.value for field in view.threat}["ε"] == "2/255, 8/255"


def test_query_cost_section_shows_curves_of_black_box_fixed_eps_attacks(results, tmp_path):
    view = build_view(results)

    (row,) = view.query_rows  # Sign-OPT is minimum-norm: no success curve
    assert (row.name, row.eps, row.samples, row.success_rate) == ("square-linf", "0.3", "99", "94.9 %")
    assert (row.mean, row.median, row.p90, row.budget) == ("117.5", "75", "280", "2,000")
    assert view.query_chart_svg.startswith("<svg")
    _, pdf_path = write_report(results, tmp_path)
    assert "Query cost" in _pdf_text(pdf_path)


def test_distortion_section_lists_min_norm_checkpoints(results):
    view = build_view(results)

    rows = [(r.name, r.queries, r.median, r.found) for r in view.distortion_rows]
    assert rows == [
        ("sign-opt-l2", "500", "not yet found", "2 of 5"),
        ("sign-opt-l2", "1,000", "3.1", "3 of 5"),
        ("sign-opt-l2", "2,000", "2.25", "4 of 5"),
    ]
    assert view.distortion_chart_svg.startswith("<svg")
    assert "Distortion against queries" in render_html(view)


def test_results_without_query_curves_render_without_the_section(results):
    del results["attacks"][0]["runs"]

    view = build_view(results)

    assert view.query_rows == () and view.query_chart_svg is None
    assert "Query cost" not in render_html(view)


def test_html_escapes_results_values(results):
    results["model"]["path"] = "models/<script>alert(1)</script>.onnx"
    results["checks"][0]["message"] = "<b>bold</b> & co"
    results["attacks"][0]["name"] = "--><script>evil()</script>"  # also a chart legend label

    html = render_html(build_view(results))

    assert "<script>" not in html and "<b>bold</b>" not in html
    assert "models/&lt;script&gt;alert(1)&lt;/script&gt;.onnx" in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in html
    assert "<svg" in html  # the chart is our own markup and stays inline


def test_two_renders_are_byte_identical(results):
    first = render_html(build_view(results))
    second = render_html(build_view(copy.deepcopy(results)))

    assert first == second


def test_without_policy_the_report_is_not_gated(results):
    del results["policy"]

    view = build_view(results)
    html = render_html(view)

    assert (view.verdict.status, view.verdict.text, view.policy) == ("none", "NOT GATED", None)
    assert "NOT GATED" in html and "Requirements not met" not in html


def test_without_attacks_the_report_has_no_chart(results):
    results.update(access={"level": "none", "reason": "auto: no access"}, robust_accuracy={}, attacks=[])
    results["threat"]["eps"] = []

    view = build_view(results)

    assert view.chart_svg is None
    assert "No attacks were run" in render_html(view)


def test_failed_pdf_leaves_no_files(results, tmp_path, monkeypatch):
    write_report(results, tmp_path)  # an earlier report, which the failed run must not leave behind

    def fail(*args, **kwargs):
        raise RuntimeError("weasyprint broke")

    monkeypatch.setattr(weasyprint.HTML, "write_pdf", fail)

    with pytest.raises(RuntimeError, match="weasyprint broke"):
        write_report(results, tmp_path)

    assert list(tmp_path.iterdir()) == []


def test_the_pdf_loads_nothing_the_html_refers_to(tmp_path, caplog):
    """Neither a file nor the network: WeasyPrint refuses each URL with a
    logged error, and a report with something it could not draw is no report."""
    image = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(image)
    html = (f'<p>text</p><img src="{image.as_uri()}"><img src="file:///etc/passwd">'
            '<link rel="stylesheet" href="http://127.0.0.1:1/style.css">')
    with pytest.raises(RuntimeError, match="^WeasyPrint could not render the report: "):
        write_pdf(html, tmp_path / "report.pdf")
    assert not (tmp_path / "report.pdf").exists()
    for url in (image.as_uri(), "file:///etc/passwd", "http://127.0.0.1:1/style.css"):
        assert f"disallowed protocol: {url}" in caplog.text


def test_an_interrupt_while_the_pdf_renders_is_not_lost(results, tmp_path, monkeypatch):
    """WeasyPrint catches BaseException around each SVG it draws: Ctrl-C
    there was swallowed, and the scan finished with a chart missing."""
    import weasyprint

    def swallowing(self, target, **options):
        try:
            signal.raise_signal(signal.SIGINT)
        except BaseException:  # noqa: BLE001 - what WeasyPrint does around an SVG
            pass
        Path(target).write_bytes(b"%PDF-1.7")

    monkeypatch.setattr(weasyprint.HTML, "write_pdf", swallowing)
    with pytest.raises(KeyboardInterrupt):
        write_report(results, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_writing_a_pdf_leaves_pillow_refusing_truncated_images(tmp_path):
    """Importing WeasyPrint sets Pillow's process-wide LOAD_TRUNCATED_IMAGES;
    an API caller's later image loads must not inherit it (a fresh process:
    this one imported WeasyPrint already)."""
    script = ("from auditor.report.render import write_pdf; from PIL import ImageFile; "
              f"write_pdf('<p>x</p>', {str(tmp_path / 'r.pdf')!r}); print(ImageFile.LOAD_TRUNCATED_IMAGES)")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert shown.split() == ["False"]


@pytest.mark.parametrize("bad", [{"schema": "auditor.policy/1"}, {"accuracy": 0.9}, [1, 2]])
def test_non_results_raise_audit_error(bad, tmp_path):
    with pytest.raises(AuditError, match="runs.json is not an auditor results file"):
        write_report(bad, tmp_path / "out", source="runs.json")

    assert not (tmp_path / "out").exists()


def test_incomplete_results_raise_audit_error(results):
    del results["threat"]

    with pytest.raises(AuditError, match="missing required field 'threat'"):
        build_view(results)


def test_complete_results_validate(results):
    assert validate_results(results) is results


def _set(results: dict, field: str, value) -> None:
    """Set (or with ``DELETE``, remove) a dotted field such as ``threat.budget`` or ``attacks.0.queries``."""
    *parents, last = [int(part) if part.isdigit() else part for part in field.split(".")]
    for part in parents:
        results = results[part]
    if value is DELETE:
        del results[last]
    else:
        results[last] = value


DELETE = object()
MALFORMED = [
    ("clean_accuracy", "high", "clean_accuracy must be a number in [0, 1], got 'high'"),
    ("clean_accuracy", 1.5, "clean_accuracy must be a number in [0, 1], got 1.5"),
    ("clean_accuracy", True, "clean_accuracy must be a number in [0, 1], got True"),
    ("clean_accuracy", DELETE, "missing required field 'clean_accuracy'"),
    ("robust_accuracy", DELETE, "missing required field 'robust_accuracy'"),
    ("robust_accuracy", [0.5], "robust_accuracy must be a mapping of ε to numbers in [0, 1], got [0.5]"),
    ("robust_accuracy", {"big": 0.5}, "robust_accuracy: key 'big' is not an ε (a number >= 0)"),
    ("robust_accuracy", {"0.1": "62%"}, "robust_accuracy['0.1'] must be a number in [0, 1], got '62%'"),
    ("threat.norm", DELETE, "missing required field 'threat.norm'"),
    # the fields of design.md §3 that `check` passed and `report` refused
    ("model.sha256", DELETE, "missing required field 'model.sha256'"),
    ("model.num_classes", "ten", "model.num_classes must be an integer >= 1, got 'ten'"),
    ("data.name", DELETE, "missing required field 'data.name'"),
    ("access.reason", DELETE, "missing required field 'access.reason'"),
    ("attacks.0.paper", DELETE, "missing required field 'attacks[0].paper'"),
    ("threat.eps", [0.1, "0.2"], "threat.eps[1] must be a number >= 0, got '0.2'"),
    ("threat.budget", "2000", "threat.budget must be an integer >= 1 or null, got '2000'"),
    ("attacks", {}, "attacks must be a list, got {}"),
    ("attacks.1", "sign-opt", "attacks[1] must be a mapping, got 'sign-opt'"),
    ("attacks.0.queries.median", "80", "attacks[0].queries.median must be a number >= 0 or null, got '80'"),
    ("samples", None, "samples must be a list, got None"),
    ("checks.0", "softmax", "checks[0] must be a mapping, got 'softmax'"),
    ("data.n", -1, "data.n must be an integer >= 0, got -1"),
    ("seconds", "42 s", "seconds must be a number >= 0, got '42 s'"),
    ("samples.0.distortion", "x", "samples[0].distortion must be a number >= 0 or null, got 'x'"),
    ("attacks.0.params", "x", "attacks[0].params must be a mapping, got 'x'"),
    ("threat.target", "random", "threat.target must be a mapping or null, got 'random'"),
    # auditor check read {} as untargeted and passed robust_accuracy; auditor report refused it
    ("threat.target", {}, "missing required field 'threat.target.mode'"),
    ("threat.target", {"mode": "bogus"}, "threat.target.mode must be one of random, least-likely, class, got 'bogus'"),
    ("threat.target", {"mode": "class", "class": "x"}, "threat.target.class must be an integer >= 0, got 'x'"),
    ("threat.target", {"mode": "class", "class": 10}, "threat.target.class is 10, not a class of the 10-class model"),
    ("threat.eps", [0.1, 0.2], "robust_accuracy has ε ['0.1', '0.2', '0.3'] but threat.eps is ['0.1', '0.2']"),
    ("policy.passed", True, "policy.passed is true, but 1 of 2 requirements failed"),
    ("policy.passed", "no", "policy.passed must be true or false, got 'no'"),
    ("model.input_shape", 5, "model.input_shape must be a list, got 5"),
    ("model.input_shape", [1, 0, 28], "model.input_shape[1] must be an integer >= 1, got 0"),
    ("eps_50", -1, "eps_50 must be a number >= 0 or null, got -1"),
    ("eps_50", "abc", "eps_50 must be a number >= 0 or null, got 'abc'"),
    ("data.n", 2, "samples lists 3 samples, more than data.n = 2"),
    ("attacks.0.name", 5, "attacks[0].name must be a string, got 5"),
    ("checks.0.level", 3, "checks[0].level must be a string, got 3"),
    ("attacks.0.samples", "abc", "attacks[0].samples must be an integer >= 0, got 'abc'"),
    ("attacks.0.success_rate", "abc", "attacks[0].success_rate must be a number in [0, 1] or null, got 'abc'"),
    ("attacks.0.seconds", None, "attacks[0].seconds must be a number >= 0, got None"),
    ("attacks.0.queries.mean", "abc", "attacks[0].queries.mean must be a number >= 0 or null, got 'abc'"),
    ("attacks.0.robust_accuracy", {"zz": 0.5}, "attacks[0].robust_accuracy: key 'zz' is not an ε (a number >= 0)"),
    ("attacks.0.robust_accuracy", {"0.1": "x"},
     "attacks[0].robust_accuracy['0.1'] must be a number in [0, 1], got 'x'"),
    ("attacks.0.runs.0.eps", "abc",
     "attacks[0].runs[0].eps must be a number >= 0 (a fixed-ε attack's run has its ε), got 'abc'"),
    ("attacks.1.runs.0.eps", "abc", "attacks[1].runs[0].eps must be a number >= 0 or null, got 'abc'"),
    ("attacks.0.runs.0.broken", 100, "attacks[0].runs[0]: broken is 100, more than its 99 samples"),
    ("attacks.0.runs.0.success_curve.success_rate", ["x"],
     "attacks[0].runs[0].success_curve.success_rate[0] must be a number in [0, 1] or null, got 'x'"),
    ("attacks.0.runs.0.success_curve.queries", [1, 10],
     "attacks[0].runs[0].success_curve: its lists differ in length (queries 2, success_rate 5)"),
    ("attacks.1.runs.0.distortion_at_queries.median", [None, "3.1", 2.25],
     "attacks[1].runs[0].distortion_at_queries.median[1] must be a number >= 0 or null, got '3.1'"),
    # hand edits that contradict the rest of the file, or the auditor
    ("threat.norm", "l7", "threat.norm must be one of linf, l2, got 'l7'"),
    ("access.level", "god-mode", "access.level must be one of white-box, soft-label, hard-label, none, got 'god-mode'"),
    ("checks.0.level", "critical", "checks[0].level must be one of info, warning, error, got 'critical'"),
    ("attacks.0.access", "root", "attacks[0].access must be one of white-box, soft-label, hard-label, none, got 'root'"),
    ("attacks.0.kind", "fixed", "attacks[0].kind must be one of fixed-eps, min-norm, got 'fixed'"),
    ("attacks.1.norm", "l1", "attacks[1].norm must be one of linf, l2, got 'l1'"),
    # was "malformed auditor results file: float() argument must be a string or a real number, not 'NoneType'"
    ("attacks.0.runs.0.eps", None,
     "attacks[0].runs[0].eps must be a number >= 0 (a fixed-ε attack's run has its ε), got None"),
    ("attacks.0.runs.0.eps", 0.25, "attacks[0].runs[0].eps is 0.25, not one of threat.eps [0.1, 0.2, 0.3]"),
    ("attacks.0.runs.0.success_curve.success_rate", [0.1, 0.3, 0.6, 0.9, 1.0],
     "attacks[0].runs[0].success_curve ends at a success rate of 1.0, but 94 of 99 samples broken is 0.949495"),
    ("attacks.1.runs.0.distortion_at_queries.found", [2, 3, 6],
     "attacks[1].runs[0].distortion_at_queries: found is 6, more than the run's 5 samples"),
    ("attacks.0.queries.max", 2500, "attacks[0].queries.max is 2500, above its budget of 2000 queries per sample per run"),
    ("attacks.0.runs.0.queries_to_success.p90", 2000.5,
     "attacks[0].runs[0].queries_to_success.p90 is 2000.5, above its budget of 2000 queries per sample per run"),
    ("attacks.0.runs.0.per_sample", {"queries": [10, 2001]},
     "attacks[0].runs[0].per_sample.queries[1] is 2001, above its budget of 2000 queries per sample per run"),
    ("model.output", 5, "model.output must be a string, got 5"),
    ("model.normalisation", {"mean": [0.1], "std": "x"}, "model.normalisation.std must be a list, got 'x'"),
]


def test_results_without_a_budget_follow_the_design_contract(results):
    """design.md §3 lists threat {norm, eps}; the budget is extra, not required."""
    del results["threat"]["budget"]
    assert validate_results(results) is results


def test_agreement_uses_the_exact_eps_not_its_rounded_key(results):
    """ε = 10/3 is keyed '3.33333', 3e-6 below it: a sample 3.333366 away is
    within ε's bound, so broken, and a robust accuracy of 0 is right."""
    eps = 10 / 3
    results["threat"]["eps"] = [eps]
    results["robust_accuracy"] = {"3.33333": 0.0}
    results["attacks"][0]["runs"][0]["eps"] = eps
    results["data"]["n"] = 1
    results["samples"] = [{**results["samples"][0], "distortion": 3.333366}]
    results["clean_accuracy"] = 1.0
    assert validate_results(results) is results


def test_clean_accuracy_must_agree_with_the_samples_when_all_are_listed(results):
    """A hand-edited clean_accuracy passed a policy's clean-accuracy gate while
    the samples said otherwise."""
    results["data"]["n"] = 3
    results["robust_accuracy"] = {"0.1": 2 / 3, "0.2": 2 / 3, "0.3": 1 / 3}
    results["clean_accuracy"] = 2 / 3
    assert validate_results(results) is results
    results["clean_accuracy"] = 0.99
    with pytest.raises(AuditError, match=r"clean_accuracy is 0.99, but the samples' clean predictions give 0.666667"):
        validate_results(results)


def test_robust_accuracy_cannot_exceed_any_attacks_own(results):
    """The worst case over the attacks is at most each one's figure: a
    hand-edited 0.9 passed once data.n no longer matched the samples listed."""
    results["attacks"][1]["robust_accuracy"] = {"0.1": 0.62, "0.2": 0.21, "0.3": 0.03}
    assert validate_results(results) is results
    results["robust_accuracy"]["0.1"] = 0.9
    with pytest.raises(AuditError, match=r"robust_accuracy 0.1 is 0.9, above attacks\[1\] \(sign-opt-l2\)'s 0.62"):
        validate_results(results)


def test_robust_accuracy_must_agree_with_the_samples_when_all_are_listed(results):
    """With every sample listed, robust accuracy at ε is the share whose
    distortion is none or above ε: 2 of 3 at 0.1 (a hand-edited 0.99 was
    rendered beside the samples' counts)."""
    results["data"]["n"] = 3
    results["robust_accuracy"] = {"0.1": 2 / 3, "0.2": 2 / 3, "0.3": 1 / 3}
    results["clean_accuracy"] = 2 / 3
    assert validate_results(results) is results
    results["robust_accuracy"]["0.1"] = 0.99
    with pytest.raises(AuditError, match=r"robust_accuracy 0.1 is 0.99, but the samples' distortions give 0.666667"):
        validate_results(results)


@pytest.mark.parametrize(("field", "value", "problem"), MALFORMED)
def test_malformed_results_raise_one_line_error_naming_the_field(results, tmp_path, field, value, problem):
    _set(results, field, value)

    with pytest.raises(AuditError) as info:
        write_report(results, tmp_path / "out" / "report", source="runs.json")

    assert str(info.value) == f"runs.json: {problem}"
    assert not (tmp_path / "out").exists()


def test_failed_write_removes_the_folders_it_created(results, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("weasyprint broke")

    monkeypatch.setattr(weasyprint.HTML, "write_pdf", fail)

    with pytest.raises(RuntimeError, match="weasyprint broke"):
        write_report(results, tmp_path / "new" / "report")

    assert list(tmp_path.iterdir()) == []


def test_a_narrowed_battery_transfer_budgets_and_float_params_read_plainly(results):
    results["checks"].append({"id": "custom-battery", "level": "warning", "message": "--attacks left out ..."})
    results["attacks"][0]["params"] = {"norm": "linf", "resize": 1.1036789297658862}
    transfer = {**results["attacks"][0], "name": "transfer-mi-linf", "access": "none",
                "queries": {**results["attacks"][0]["queries"], "budget": None}}
    results["attacks"].append(transfer)
    view = build_view(results)
    assert "against hard-label attacks chosen with --attacks;" in view.verdict.summary
    assert view.attacks[0].params == "norm=linf, resize=1.104"
    assert view.attacks[-1].budget == "1 (its verification)" and view.attacks[0].budget == "2,000"


def test_the_model_section_names_the_architecture_and_its_source_hash(results):
    """Weights files are identified by their weights and by the code that
    builds the network; the report shows both when the results have them."""
    assert "Architecture" not in [field.label for field in build_view(results).model]
    results["model"].update(arch="examples.mnist_cnn:build", arch_sha256="ab" * 32)
    fields = {field.label: field.value for field in build_view(results).model}
    assert fields["Architecture"] == "examples.mnist_cnn:build"
    assert fields["SHA-256 of the architecture's module file"] == "ab" * 32


def test_the_model_section_says_which_output_layout_and_normalisation_were_audited(results):
    """results.json records the ONNX output audited, an NHWC input and the
    --mean/--std folded into the model; the report showed none of them, so
    ε read as if measured in normalised space."""
    labels = [field.label for field in build_view(results).model]
    assert not {"Output audited", "Input layout", "Normalisation (folded into the model)"} & set(labels)
    results["model"].update(output="probabilities", input_layout="NHWC",
                            normalisation={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})

    view = build_view(results)

    fields = {field.label: field for field in view.model}
    assert fields["Output audited"].value == "probabilities" and fields["Output audited"].mono
    assert fields["Input layout"].value == ("NHWC: the graph takes (N, H, W, C); the auditor transposes the "
                                            "(C, H, W) images for it")
    assert fields["Normalisation (folded into the model)"].value == (
        "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225); ε is measured on the [0, 1] image, before the "
        "normalisation")
    results["model"]["normalisation"] = {"mean": [0.1307], "std": [0.3081]}
    assert {field.label: field.value for field in build_view(results).model}[
        "Normalisation (folded into the model)"].startswith("mean 0.1307, std 0.3081; ")
    assert "Normalisation (folded into the model)" in render_html(view)


def test_percentages_never_round_to_100_or_0_unless_exact(results, capsys):
    """1 sample broken of 4,000 is 99.975 % robust: one decimal would show
    "100.0 %" beside "1 of 4,000" broken, so the report, the transfer matrix
    and the CLI summary all show "> 99.9 %" (and "< 0.1 %" at the other end)."""
    results["data"]["n"] = 4000
    results["robust_accuracy"] = {"0.1": 0.99975, "0.2": 0.99975, "0.3": 0.00025}
    results["clean_accuracy"] = 1.0
    results["attacks"][0]["success_rate"] = 0.00025
    results["transfer"] = {
        "surrogates": [{"name": "mlp", "source": "trained", "clean_accuracy": 0.99975}],
        "sets": ["mlp"], "baseline": "transfer-ifgsm-linf", "samples": {"0.3": 4000},
        "matrix": {"0.3": {"transfer-ifgsm-linf": {"mlp": 0.00025}}},
    }

    view = build_view(results)

    assert [(row.robust_accuracy, row.broken) for row in view.robust_rows] == [
        ("> 99.9 %", "1 of 4,000"), ("> 99.9 %", "1 of 4,000"), ("< 0.1 %", "3,999 of 4,000"),
    ]
    assert view.verdict.summary.startswith("Robust accuracy < 0.1 % at ε=0.3") and "clean accuracy 100.0 %" in \
        view.verdict.summary
    assert view.attacks[0].success_rate == "< 0.1 %"
    (matrix,) = view.transfer.matrices
    assert matrix.rows[0].cells[0].text == "< 0.1 %" and view.transfer.surrogates[0].clean_accuracy == "> 99.9 %"
    _echo_summary(results)
    out = capsys.readouterr().out
    assert "clean accuracy: 100.0 % on 4000 samples" in out
    assert "robust accuracy at linf eps=0.1: > 99.9 %" in out and "robust accuracy at linf eps=0.3: < 0.1 %" in out


def _hard_label_at(results: dict, eps: list, distortions: list, eps_50) -> None:
    """Results listing every sample, with these distortions, at these ε."""
    results["threat"]["eps"] = eps
    results["attacks"][0]["runs"][0]["eps"] = max(eps)
    results["samples"] = [{**results["samples"][0], "index": number, "distortion": distortion}
                          for number, distortion in enumerate(distortions)]
    results["data"]["n"] = len(distortions)
    results["clean_accuracy"] = 1.0  # every sample is a copy of the first, classified correctly
    results["robust_accuracy"] = {
        f"{value:g}": sum(d is None or d > value for d in distortions) / len(distortions) for value in eps
    }
    results["eps_50"] = eps_50


def test_distortions_beyond_the_audited_eps_are_not_counted_as_broken(results):
    """A hard-label scan at ε = 0.05 whose minimum-norm attacks found examples
    at 0.1 and 0.12: those samples are robust under the threat model, so the
    report counts them apart, and the ε where half are broken (0.1) is outside
    the audited threat model and said to be."""
    _hard_label_at(results, [0.05], [0.0244, 0.1, 0.12, None], 0.1)

    view = build_view(results)

    distortion = view.distortion
    assert (distortion.broken, distortion.median, distortion.largest_eps) == ("1 sample", "0.0244", "0.05")
    assert (distortion.beyond, distortion.beyond_median, distortion.not_broken) == ("2 samples", "0.11", "1 sample")
    assert distortion.eps_50 == (
        "Robust accuracy stays above 50 % at every audited ε (up to 0.05). Minimum-norm attacks found adversarial "
        "examples within ε = 0.1 of half of the samples: beyond the audited ε, outside the threat model, robust "
        "accuracy falls to 50 % at or below ε = 0.1.")
    html = " ".join(render_html(view).split())
    assert "Found beyond the audited ε, by minimum-norm attacks: 2 samples" in html


@pytest.mark.parametrize("eps_50", [0.05, None])
def test_eps_50_must_agree_with_the_samples_when_all_are_listed(results, eps_50):
    """eps_50 is the lower median of the per-sample distortions: with every
    sample listed, a hand-edited value is refused like a robust accuracy."""
    _hard_label_at(results, [0.05], [0.0244, 0.1, 0.12, None], eps_50)

    with pytest.raises(AuditError, match=rf"eps_50 is {eps_50}, but the samples' distortions give 0.1$"):
        validate_results(results)


def test_eps_50_within_the_audited_eps_reads_as_an_upper_bound(results):
    """Fixed-ε attacks put their examples at the ε they ran at: half broken at
    0.1 means robust accuracy falls to 50 % at or below 0.1, not at 0.1."""
    _hard_label_at(results, [0.1, 0.2, 0.3], [0.1, 0.1, 0.2, None], 0.1)

    text = build_view(results).distortion.eps_50

    assert text.startswith("Robust accuracy falls to 50 % at or below ε = 0.1: half of the samples")
    assert text.endswith("a fixed-ε attack's examples lie at the ε it ran at.")
    assert "beyond the audited ε" not in text


def test_eps_50_sentence_without_a_value(results):
    """Null eps_50 (more than half never broken) reads as a sentence; results
    without the field (older versions) leave the sentence out."""
    _hard_label_at(results, [0.1], [0.05, None, None], None)
    assert build_view(results).distortion.eps_50 == (
        "More than half of the samples have no adversarial example from any attack, so the audit finds no ε at "
        "which robust accuracy falls to 50 %.")
    del results["eps_50"]
    view = build_view(results)
    section = render_html(view).split("Adversarial distortion")[1].split("</section>")[0]
    assert view.distortion.eps_50 == "" and "50 %" not in section


def test_unreadable_fields_beyond_the_checks_are_a_one_line_audit_error(results, tmp_path):
    """A hand-edited transfer record the schema does not describe is refused
    as malformed, not reported as an internal error, and nothing is written."""
    results["transfer"] = {"surrogates": "mlp", "sets": [], "baseline": None, "samples": {}, "matrix": {}}

    with pytest.raises(AuditError, match=r"^runs.json is a malformed auditor results file: string indices"):
        write_report(results, tmp_path / "out", source="runs.json")

    assert not (tmp_path / "out").exists()


def test_report_explains_each_raised_check_from_the_shipped_docs(results, tmp_path):
    """The check id's explanation is in the report itself (a link to
    docs/checks.md resolves nowhere next to a report or in its PDF), once per
    id, without markdown marks or links; an id the docs lack says so."""
    results["checks"] += [
        {"id": "custom-battery", "level": "warning", "message": "--attacks left out square-linf"},
        {"id": "softmax-outputs", "level": "warning", "message": "again"},
        {"id": "made-up", "level": "info", "message": "from a newer version"},
    ]

    view = build_view(results)

    assert [note.id for note in view.check_notes] == ["softmax-outputs", "custom-battery", "made-up"]
    softmax, custom, unknown = view.check_notes
    assert softmax.paragraphs[0].startswith("The model's outputs are non-negative and sum to one: it returns "
                                            "probabilities, not logits, and in this white-box audit")
    assert "--attacks chose the battery" in custom.paragraphs[0]
    assert not any(mark in custom.paragraphs[0] for mark in ("**", "`", "](", ".md"))
    assert unknown.paragraphs == ("This auditor version's documentation does not describe this check.",)
    html = render_html(view)
    assert "docs/checks.md" not in html and 'id="check-softmax-outputs"' in html
    _, pdf_path = write_report(results, tmp_path)
    assert "it returns probabilities, not logits" in _pdf_text(pdf_path)


def test_every_documented_check_reads_as_plain_text():
    """Each paragraph of docs/checks.md, as the report quotes it, is text
    without markdown marks or links."""
    explanations = check_explanations()

    assert len(explanations) >= 12
    for check_id, paragraphs in explanations.items():
        assert paragraphs and all(not any(mark in text for mark in ("**", "`", "](")) for text in paragraphs), check_id
        assert paragraphs[0][0].isupper() or paragraphs[0].startswith("--"), check_id


def test_query_budget_is_stated_for_the_black_box_attacks_only(results):
    """White-box attacks have no query budget (the attack table says
    "unlimited"); the threat model says which attacks the budget limits,
    and that it is per run: "for each soft- and hard-label attack" hid that
    a fixed-ε attack, run once per ε, may spend it on a sample at each ε."""
    def budget() -> str:
        return {field.label: field.value for field in build_view(results).threat}["Query budget"]

    per_run = ("2,000 queries per sample for each run of a soft- or hard-label attack: a fixed-ε attack runs once "
               "per ε (up to 6,000 queries on a sample over the 3 ε), a minimum-norm attack once for all ε")
    assert budget() == per_run
    results["attacks"][1].update(access="white-box")
    assert budget() == per_run + "; the white-box attacks are not limited by it"
    results["attacks"][0].update(access="white-box")
    assert budget() == "not used: no soft- or hard-label attack ran"
    lead = " ".join(render_html(build_view(results)).split("<h2>Threat model</h2>")[1].split("</p>")[0].split())
    assert "per sample and per run: a fixed-ε attack runs once per ε" in lead
    assert "for each soft- and hard-label attack" not in lead


def test_the_threat_model_claims_robustness_against_the_battery_only(results):
    """"Using only the model access below (and every weaker level)" claimed
    robustness against every weaker attacker, but a soft-label battery runs
    no label-only attack."""
    lead = " ".join(render_html(build_view(results)).split("<h2>Threat model</h2>")[1].split("</p>")[0].split())

    assert "every weaker level" not in lead
    assert "Robust accuracy is the worst case over this audit's battery, the attacks listed under Attacks, not " \
           "over every attacker with this access or less" in lead


def test_an_attacks_row_and_its_details_stay_on_one_page(results, tmp_path):
    """WeasyPrint ignores page-break-inside on the tbody that holds an
    attack's two rows: with enough attacks, a page ended between one's row and
    the row with its paper and parameters."""
    attack = {key: value for key, value in results["attacks"][0].items() if key != "runs"}
    results["attacks"] = [
        {**attack, "name": f"x{number:02d}", "paper": f"ref{number:02d} " + "A paper, a venue, a year. " * 12}
        for number in range(40)
    ]
    pdf_path = tmp_path / "report.pdf"
    write_pdf(render_html(build_view(results)), pdf_path)

    pages = [page.extract_text() for page in pypdf.PdfReader(pdf_path).pages]
    rows = [set(re.findall(r"\bx(\d\d)\b", text)) for text in pages]
    details = [set(re.findall(r"\bref(\d\d)\b", text)) for text in pages]
    assert rows == details and set().union(*rows) == {f"{number:02d}" for number in range(40)}


def _passed(results: dict) -> None:
    """Make the fixture's policy pass: its robust accuracy requirement too."""
    results["policy"]["requirements"][1].update(passed=True, actual="0.03 at ε=0.3")
    results["policy"]["passed"] = True


def test_the_cover_lists_the_checks_above_info_and_marks_overstated_robust_accuracy(results):
    """A PASS with warnings looked clean: the cover counted the checks only.
    It now lists every check above info level, errors first, and a check
    that says robust accuracy is overstated marks the headline and the verdict."""
    _passed(results)
    results["checks"] += [
        {"id": "access-limited", "level": "info", "message": "the audit ran at hard-label access"},
        {"id": "small-budget", "level": "error", "message": "--budget 60 is below 1,000 queries per sample"},
    ]

    view = build_view(results)

    assert [(check.id, check.level) for check in view.cover_checks] == [
        ("small-budget", "error"), ("softmax-outputs", "warning")]
    robust = {headline.label: headline for headline in view.headlines}["Robust accuracy"]
    assert robust.flag == "may be overstated — see the checks below"
    assert view.verdict.status == "pass"
    assert view.verdict.caveat == ("Robust accuracy may be overstated (small-budget): read the 2 checks above info "
                                   "level, listed below.")
    cover = render_html(view).split('<section class="cover">')[1].split("</section>")[0]
    assert "--budget 60 is below 1,000 queries per sample" in cover and "may be overstated — see the checks" in cover
    assert cover.index("small-budget") < cover.index("softmax-outputs") and "access-limited" not in cover
    del results["checks"][1:]
    view = build_view(results)
    assert {headline.label: headline.flag for headline in view.headlines}["Robust accuracy"] == ""
    assert view.verdict.caveat == "Read the 1 check above info level, listed below, before relying on this verdict."


def test_robust_accuracy_of_0_or_none_is_never_called_overstated(results):
    """0 % cannot be overstated, nor can a figure that does not exist; a weak
    surrogate overstates only where transfer attacks were all that ran."""
    results["checks"] = [{"id": "small-budget", "level": "error", "message": "--budget 60"},
                         {"id": "weak-surrogate", "level": "warning", "message": "mlp classifies 9 %"}]
    assert build_view(results).verdict.caveat.startswith("Robust accuracy may be overstated (small-budget)")
    results["robust_accuracy"] = {key: 0.0 for key in results["robust_accuracy"]}
    view = build_view(results)
    assert view.verdict.caveat == "Read the 2 checks above info level, listed below, before relying on this verdict."
    assert {headline.label: headline.flag for headline in view.headlines}["Robust accuracy"] == ""
    results["robust_accuracy"], results["attacks"] = {}, []
    results["threat"]["eps"] = []
    assert "overstated" not in build_view(results).verdict.caveat
    results["checks"] = results["checks"][1:]
    results["robust_accuracy"], results["threat"]["eps"] = {"0.3": 0.5}, [0.3]
    assert "overstated" not in build_view(results).verdict.caveat  # white-box, hard-label...: other attacks ran
    results["access"]["level"] = "none"
    assert "overstated (weak-surrogate)" in build_view(results).verdict.caveat


def test_chart_ticks_leave_room_for_their_labels():
    """ε of 0.01 and 0.02 beside 0 printed on top of each other."""
    from auditor.report.build import _spread

    assert _spread([0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert _spread([0.0, 0.1, 0.2, 0.3]) == [0.0, 0.1, 0.2, 0.3]


def test_one_sample_and_an_unknown_version_read_plainly(results):
    from auditor.report.build import _manifest_fields, _robust_definition

    results["data"]["n"] = 1
    results["auditor_version"] = None
    assert "share of the 1 audited sample that" in _robust_definition(results)
    assert {field.label: field.value for field in _manifest_fields(results)}["auditor"] == "(version unknown)"


def test_access_level_none_reads_as_transfer_attacks_only(results):
    """"against none attacks" named an access level, not the attacks."""
    results["access"] = {"level": "none", "reason": "requested with --access none"}
    results["attacks"][0]["access"] = "none"

    view = build_view(results)

    assert "against transfer attacks only (no model access); clean accuracy" in view.verdict.summary
    assert {field.label: field.value for field in view.threat}["Access level"] == (
        "none (no model access: transfer attacks only)")
    assert view.attacks[0].access == "none (transfer)"
    assert {headline.label: headline.notes for headline in view.headlines}["Attacker access"][0] == "no model access"
    assert "none attacks" not in render_html(view)


def test_the_cover_defines_robust_accuracy_and_names_a_targeted_audits_mode(results):
    results["threat"]["target"] = {"mode": "random"}

    view = build_view(results)

    definition = view.robust_definition
    assert definition.startswith("Robust accuracy at ε is the share of all 100 audited samples that the model "
                                 "classifies correctly and that no attack of the battery broke within ε: the "
                                 "per-sample worst case over the battery, every adversarial example re-verified on "
                                 "the real runtime")
    assert "An attack breaks a sample only when the model outputs the sample's target class" in definition
    robust = {headline.label: headline.notes for headline in view.headlines}["Robust accuracy"]
    assert robust == ("at ε=0.3 (L∞)", "targeted (random)", "95 % CI 1.0–8.5 %")
    assert escape(definition) in render_html(view)
    results["threat"]["target"] = None
    assert "target class" not in build_view(results).robust_definition


def test_the_policy_shows_its_description_the_requirements_met_and_accuracies_as_percentages(results):
    results["policy"]["description"] = "Release gate: accurate and robust."
    results["policy"]["requirements"].append(
        {"id": "median_queries", "description": "median queries >= 1000 (hard-label)", "passed": True,
         "actual": "1200 queries (sign-opt-l2)"})
    _passed(results)

    view = build_view(results)

    policy = view.policy
    assert policy.description == "Release gate: accurate and robust."
    assert [row.actual for row in policy.requirements] == [
        "99.0 %", "3.0 % at ε=0.3", "1200 queries (sign-opt-l2)"]
    cover = " ".join(render_html(view).split('<section class="cover">')[1].split("</section>")[0].split())
    assert "strict — Release gate: accurate and robust." in cover and "Requirements met" in cover
    assert "robust accuracy &gt;= 80 % at linf eps=0.3 <span class=\"muted\">(actual 3.0 % at ε=0.3)</span>" in cover


def test_the_attack_table_says_which_samples_and_which_eps_its_success_is_at(results):
    """Transfer attacks all attack the same samples, and the success rate is
    at the largest ε an attack ran at: the table said neither."""
    results["attacks"][0]["runs"][0]["eps"] = 0.2
    view = build_view(results)
    # sign-opt-l2 works in L2, but its success is counted within the L∞ ε: "ε=0.3" beside "L2" read as an L2 radius
    assert [(row.success_rate, row.success_eps) for row in view.attacks] == [("95.0 %", "0.2"), ("40.0 %", "0.3 L∞")]
    html = " ".join(render_html(view).split())
    assert "Success<br>(at ε)" in html and "all attack the same samples" not in html
    assert '<span class="muted small">ε=0.3 L∞</span>' in html

    results["transfer"] = {
        "surrogates": [{"name": "mlp", "source": "trained", "clean_accuracy": 0.9}], "sets": ["mlp"],
        "baseline": "transfer-ifgsm-linf", "samples": {"0.3": 99},
        "matrix": {"0.3": {"transfer-ifgsm-linf": {"mlp": 0.5}}},
    }
    html = " ".join(render_html(build_view(results)).split())
    assert "except that the transfer attacks (access none) all attack the same samples" in html


def _transfer(results: dict, sets: list[str], matrix: dict) -> dict:
    results["transfer"] = {
        "surrogates": [{"name": name, "source": "trained", "clean_accuracy": 0.9} for name in sets if name != "ensemble"],
        "sets": sets, "baseline": "transfer-ifgsm-linf", "samples": {"0.3": 99}, "matrix": {"0.3": matrix},
    }
    return results


def test_transfer_section_says_when_there_is_no_ensemble_and_when_cells_tie(results):
    one = _transfer(results, ["mlp"], {"transfer-ifgsm-linf": {"mlp": 1.0}, "transfer-mi-linf": {"mlp": 1.0},
                                       "transfer-di-linf": {"mlp": 1.0}})
    view = build_view(one)

    assert view.transfer.ran_on == "the one surrogate, mlp (with a single surrogate there is no ensemble)"
    html = " ".join(render_html(view).split())
    assert "Each method below ran on the one surrogate, mlp (with a single surrogate there is no ensemble)" in html
    assert view.transfer.matrices[0].best == (
        "No best cell: every method but transfer-ifgsm-linf fooled 100.0 % of the samples from every surrogate set; "
        "no method beats transfer-ifgsm-linf from the same surrogates.")
    two = _transfer(results, ["mlp", "cnn", "ensemble"], {
        "transfer-ifgsm-linf": {"mlp": 0.5, "cnn": 0.5, "ensemble": 0.6},
        "transfer-mi-linf": {"mlp": 0.7, "cnn": 0.7, "ensemble": 0.6}})
    view = build_view(two)
    assert view.transfer.ran_on == "each surrogate alone and on their ensemble"
    assert view.transfer.matrices[0].best == (
        "Best, tied: transfer-mi-linf from mlp, transfer-mi-linf from cnn, 70.0 % of the samples, against 50.0 % "
        "for transfer-ifgsm-linf (+20.0 points).")


def _legend(svg: str) -> str:
    """The chart's text (matplotlib writes each text's string in a comment before its glyphs)."""
    return " ".join(re.findall(r"<!-- (.*?) -->", svg))


def test_chart_series_stay_distinguishable(results):
    """Past 10 series the colours repeated, curves on top of each other hid
    all but the last, and a single query checkpoint made a chart of dots."""
    base = results["attacks"][0]
    results["attacks"] = [
        {**base, "name": f"attack{number}", "robust_accuracy": {"0.1": 0.80 - 0.01 * number, "0.2": 0.3, "0.3": 0.05}}
        for number in range(12)
    ]
    results["attacks"].append({**base, "name": "late", "robust_accuracy": results["attacks"][-1]["robust_accuracy"]})
    svg = build_view(results).chart_svg
    assert "stroke-dasharray" in svg  # the 11th and 12th curves are dashed
    assert "after attack11 = after late (overlapping)" in _legend(svg)

    single = {"queries": [60], "median": [4.61], "mean_found": [4.63], "found": [5]}
    results["attacks"] = [{**base, "name": "sign-opt-l2", "kind": "min-norm",
                           "runs": [{"eps": None, "samples": 5, "broken": 0, "queries": 300,
                                     "distortion_at_queries": single}]}]
    view = build_view(results)
    assert view.distortion_chart_svg is None and len(view.distortion_rows) == 1
    assert "so there is no curve to draw: see the table" in " ".join(render_html(view).split())


def test_nested_attack_parameters_read_plainly(results):
    """Transfer attacks' transforms read as Python reprs with unrounded floats, and NES's q=None."""
    results["attacks"][0]["params"] = {
        "transforms": [{"name": "di", "p": 0.5, "resize": 1.1036789297658862}, {"name": "mi", "mu": 1.0}],
        "q": None, "eps_n": 0.06274509803921569, "steps": 10, "norm": "linf"}

    assert build_view(results).attacks[0].params == (
        "transforms=[di(p=0.5, resize=1.104), mi(mu=1)], q=auto, eps_n=0.06275, steps=10, norm=linf")


def test_eps_50_names_fixed_eps_examples_only_when_one_holds_a_record(results):
    """The sentence said a fixed-ε attack's examples lie at its ε even where
    only minimum-norm attacks broke samples."""
    _hard_label_at(results, [0.1, 0.2, 0.3], [0.1, 0.1, 0.2, None], 0.1)
    for sample in results["samples"]:
        sample["broken_by"] = "sign-opt-l2"

    text = build_view(results).distortion.eps_50

    assert text.endswith("the attacks find small distortions, not always the smallest.")


def test_query_cost_shows_every_eps_and_points_minimum_norm_attacks_to_the_distortion_section(results):
    square = results["attacks"][0]
    smallest = {**square["runs"][0], "eps": 0.1, "broken": 30,
                "success_curve": {"queries": [1, 10, 100, 2000], "success_rate": [0.0, 0.1, 0.2, 0.30303]}}
    square["runs"] = [smallest, square["runs"][0]]

    view = build_view(results)

    assert [(row.name, row.eps, row.success_rate) for row in view.query_rows] == [
        ("square-linf", "0.3", "94.9 %"), ("square-linf", "0.1", "30.3 %")]
    # results without success_by_eps (written before minimum-norm runs carried it): no curve, said so
    assert view.query_note.startswith("sign-opt-l2: minimum-norm, with no success curve here (another norm than the threat's).")
    assert escape(view.query_note) in render_html(view)


def _success_at(eps: float, broken: int, median: float, rates: list[float]) -> dict:
    return {"eps": eps, "broken": broken,
            "queries_to_success": {"mean": median, "median": median, "p90": median, "max": int(median),
                                   "budget": 2000, "total": 10000, "measure": "to-success"},
            "success_curve": {"queries": [1, 100, 2000], "success_rate": rates}}


def test_query_cost_reads_minimum_norm_runs_at_each_eps(results, tmp_path):
    """A hard-label audit's query cost: a minimum-norm run's success at each ε,
    read off its trace, has a row and a curve like a fixed-ε run's."""
    (run,) = results["attacks"][1]["runs"]
    run["success_by_eps"] = [_success_at(0.3, 4, 900.0, [0.0, 0.2, 0.8]),
                             _success_at(0.1, 1, 1500.0, [0.0, 0.0, 0.2])]

    view = build_view(results)

    assert view.query_note.startswith("sign-opt-l2 is a minimum-norm attack: one run without a fixed ε")
    assert [(row.name, row.eps, row.samples, row.success_rate, row.median) for row in view.query_rows] == [
        ("square-linf", "0.3", "99", "94.9 %", "75"),
        ("sign-opt-l2", "0.3", "5", "80.0 %", "900"),
        ("sign-opt-l2", "0.1", "5", "20.0 %", "1,500"),
    ]
    assert "sign-opt-l2 (ε=0.1)" in view.query_chart_svg
    assert "sign-opt-l2 0.1 5 20.0 %" in " ".join(_pdf_text(write_report(results, tmp_path)[1]).split())


def test_success_by_eps_is_validated(results):
    (run,) = results["attacks"][1]["runs"]
    run["success_by_eps"] = [_success_at(0.3, 4, 900.0, [0.0, 0.2, 0.8])]
    assert validate_results(results) is results
    run["success_by_eps"][0]["broken"] = 6
    with pytest.raises(AuditError, match=r"success_by_eps\[0\]: broken is more than the run's 5 samples"):
        validate_results(results)
    run["success_by_eps"][0] = {**run["success_by_eps"][0], "broken": 4, "success_curve": {"queries": [1], "success_rate": [0.0, 1.0]}}
    with pytest.raises(AuditError, match=r"success_by_eps\[0\]\.success_curve: its lists differ in length"):
        validate_results(results)


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda entry: entry.update(eps=0.9), r"success_by_eps\[0\]\.eps is 0\.9, not one of threat\.eps \[0\.1, 0\.2, 0\.3\]$"),
    (lambda entry: entry["success_curve"].update(success_rate=[0.0, 1.0, 1.0]),
     r"success_by_eps\[0\]\.success_curve ends at a success rate of 1\.0, but 4 of 5 samples broken is 0\.8$"),
    (lambda entry: entry["queries_to_success"].update(median=5000),
     r"success_by_eps\[0\]\.queries_to_success\.median is 5000, above its budget of 2000 queries per sample per run$"),
])
def test_success_by_eps_must_agree_with_the_audit(results, edit, problem):
    """A minimum-norm run's cost at an ε that was not audited, a curve that
    ends elsewhere than its broken samples, or statistics above the budget
    (per sample and per run: no sample can spend more) were all rendered."""
    (run,) = results["attacks"][1]["runs"]
    run["success_by_eps"] = [_success_at(0.3, 4, 900.0, [0.0, 0.2, 0.8])]
    edit(run["success_by_eps"][0])

    with pytest.raises(AuditError, match=problem):
        validate_results(results)


def test_unbudgeted_and_rounded_figures_are_not_refused(results):
    """Only a budgeted attack's statistics are held to its budget (white-box
    and transfer attacks have none), and a curve's last rate is rounded to
    6 decimals: 94 of 99 is 0.949494..., written 0.949495."""
    results["attacks"][0]["queries"].update(budget=None, max=10**6, p90=10**6)
    assert validate_results(results) is results


def test_context_version_date_data_and_confidence_intervals(results, tmp_path):
    html = render_html(build_view(results))
    assert 'class="kicker stamp">auditor 0.1.0 · scan of 2026-11-24 10:00+00:00</p>' in html
    assert "content: string(stamp)" in html
    _, pdf_path = write_report(results, tmp_path)
    assert "auditor 0.1.0 · scan of 2026-11-24 10:00+00:00 — page 1 of" in _pdf_text(pdf_path)

    view = build_view(results)
    assert [(row.eps, row.robust_accuracy, row.interval) for row in (view.clean_row, *view.robust_rows)] == [
        ("0 (clean)", "99.0 %", "94.5–99.9 %"), ("0.1", "62.0 %", "52.2–71.0 %"),
        ("0.2", "21.0 %", "14.1–30.0 %"), ("0.3", "3.0 %", "1.0–8.5 %")]  # Wilson: 1.03–8.45 % for 3 of 100
    assert {headline.label: headline.notes for headline in view.headlines}["Clean accuracy"] == (
        "100 samples", "95 % CI 94.5–99.9 %")
    fields = {field.label: field.value for field in view.data}
    assert fields["Data set"] == "mnist (test split)"
    assert fields["Samples audited"] == "100 samples"  # three of 100 listed: which were audited?
    assert fields["Clean accuracy"] == "99.0 % (95 % CI 94.5–99.9 %)"

    _hard_label_at(results, [0.1], [0.05, None, None, None], 0.0)
    del results["eps_50"]
    assert {field.label: field.value for field in build_view(results).data}["Samples audited"] == "all 4 samples"
    results["samples"][3]["index"] = 917
    assert {field.label: field.value for field in build_view(results).data}["Samples audited"] == (
        "class-balanced subset of 4")


def test_the_attack_skipped_explanation_names_every_reason():
    (paragraph,) = check_explanations()["attack-skipped"]
    assert "no targeted mode" in paragraph and "no version for the threat norm" in paragraph


def _hardening_record() -> dict:
    """The ``hardening`` record of a results.json that ``auditor harden`` (fast, 2 epochs) wrote."""
    curve = [
        {"epoch": 0, "iteration": 0, "eps": 0.0, "lr": 0.0, "loss": None, "train_accuracy": None,
         "clean": 0.98, "fgsm": 0.004, "pgd": 0.0},
        {"epoch": 1, "iteration": 75, "eps": 0.3, "lr": 0.004167, "loss": 1.35, "train_accuracy": 0.53,
         "clean": 0.89, "fgsm": 0.43, "pgd": 0.066},
        {"epoch": 2, "iteration": 150, "eps": 0.3, "lr": 0.0, "loss": 1.2, "train_accuracy": 0.6,
         "clean": 0.92, "fgsm": 0.62, "pgd": 0.29},
    ]
    return {
        "schema": "auditor.hardening/1", "seed": 0, "seconds": 29.2, "training_seconds": 7.6,
        "method": {"name": "fast", "label": "FGSM-RS (fast adversarial training)", "paper": "Wong et al., ICLR 2020",
                   "params": {"alpha": 1.5, "eps_scale": 1.2, "random_init": True}},
        "config": {"epochs": 2, "batch_size": 50, "lr_max": 0.005, "lr_peak": 0.4, "eps_warmup": 0.4,
                   "eps_scale": None},
        "threat": {"norm": "linf", "eps": 0.3}, "device": {"name": "cpu", "amp": False},
        "model": {"path": "examples/mnist_cnn.onnx", "format": "onnx", "sha256": "ab" * 32},
        "output": {"path": "out/mnist_cnn-hardened.onnx", "format": "onnx", "sha256": "cd" * 32,
                   "check": {"images": 64, "max_abs_diff": 1.9e-06}},
        "data": {"name": "mnist", "train": 3744, "guard": 256, "eval": "mnist", "eval_is_training_data": False},
        "epochs_run": 2, "epochs_planned": 2, "updates": 150, "stopped_early": False, "curve": curve,
        "guard": {"enabled": True, "batch": 256, "drop": 0.2,
                  "attack": {"name": "pgd-linf", "steps": 10, "rel_step": 0.25}, "events": []},
        "before": {"clean_accuracy": 0.99, "robust_accuracy": {"0.3": 0.0}},
        "after": {"clean_accuracy": 0.97, "robust_accuracy": {"0.3": 0.6}},
    }


def test_hardening_curve_explains_the_cyclic_learning_rate_and_the_training_radius(results):
    """"Learning rate 0" at the last epoch read as nothing trained, and the
    training radius (1.2·ε for fast) appeared nowhere beside the ε column."""
    results["hardening"] = _hardening_record()

    view = build_view(results)

    hardening = view.hardening
    assert [(row.eps, row.radius, row.lr) for row in hardening.curve] == [
        ("0", "0", "0"), ("0.3", "0.36", "0.0042"), ("0.3", "0.36", "0")]
    assert "from 0 up to its peak 0.005 at 40 % of the updates, then down to 0 at the last update" in \
        hardening.curve_note
    assert "The training adversary used a radius of 1.2·ε" in hardening.curve_note
    settings = {field.label: field.value for field in hardening.settings}
    assert settings["Threat"] == "ε=0.3, L∞; training radius 1.2·ε = 0.36"
    assert settings["Method settings"] == ("alpha=1.5, eps_scale=1.2, random_init=True; "
                                           "step alpha × training radius = 1.5 × 0.36 = 0.54")
    html = " ".join(render_html(view).split())
    assert "Training radius<br>(1.2·ε)" in html and "Learning rate at<br>end of epoch" in html


def test_softmax_outputs_mark_robust_accuracy_overstated_only_at_white_box(results):
    """Gradient attacks on saturated probabilities are weakened; a soft-label
    attacker sees those probabilities by definition."""
    results["checks"] = [{"id": "softmax-outputs", "level": "warning", "message": "the model outputs probabilities"}]
    results["access"]["level"] = "white-box"
    assert build_view(results).verdict.caveat.startswith("Robust accuracy may be overstated (softmax-outputs)")
    results["access"]["level"] = "soft-label"
    assert "overstated" not in build_view(results).verdict.caveat


def test_the_hardening_training_data_names_the_built_in_split():
    from auditor.report.build import _training_data_name

    assert _training_data_name("mnist") == "mnist (train split)"
    assert _training_data_name("digits/train.npz") == "digits/train.npz"


@pytest.mark.parametrize("threshold, actual, shown", [
    ("0.7000001", "0.7 at ε=0.1", ("robust accuracy >= 70.00001 % at ε=0.1", "70.0 % at ε=0.1")),
    ("0.7", "0.69999 at ε=0.1", ("robust accuracy >= 70 % at ε=0.1", "69.999 % at ε=0.1")),
    ("0.9999", "0.95 at ε=0.1", ("robust accuracy >= 99.99 % at ε=0.1", "95.0 % at ε=0.1")),
    ("1e-07", "0.0 at ε=0.1", ("robust accuracy >= 0.00001 % at ε=0.1", "0.0 % at ε=0.1")),
    ("0.9999", "0.9998 at ε=0.1", ("robust accuracy >= 99.99 % at ε=0.1", "99.98 % at ε=0.1")),
    ("0.0001", "0.00004 at ε=0.1", ("robust accuracy >= 0.01 % at ε=0.1", "0.004 % at ε=0.1")),
    ("0.5", "0.5 at ε=0.1", ("robust accuracy >= 50 % at ε=0.1", "50.0 % at ε=0.1")),
])
def test_a_failed_requirement_never_shows_its_threshold_and_value_alike(threshold, actual, shown):
    """One decimal turned a FAIL of 0.7 against 0.7000001 into "70.0 %"
    against "70.0 %"; 0.9999 read ">= > 99.9 %", and 1e-07 was left a fraction."""
    from auditor.report.build import _requirement_texts

    assert _requirement_texts(f"robust accuracy >= {threshold} at ε=0.1", actual) == shown


def test_long_paths_and_hashes_wrap_inside_the_page(results, tmp_path):
    """A long .npz name has no break opportunity: in the PDF it widened the
    data table past the page's right edge, and the SHA-256 below it with it."""
    name = "datasets/" + "mnist_test_subset_preprocessed_for_robustness_audit_" * 2 + "v3.npz"
    results["data"]["name"] = name
    results.update(access={"level": "none", "reason": "auto: no access"}, robust_accuracy={}, attacks=[])
    results["threat"]["eps"] = []  # no charts: a quicker PDF

    view = build_view(results)

    data = {field.label: field for field in view.data}
    assert (data["Data set"].value, data["Data set"].mono) == (name, True)  # a path, in the style of the others
    assert not {field.label: field for field in build_view(_mnist(results)).data}["Data set"].mono
    html = render_html(view)
    assert re.search(r"\.fields td \{[^}]*overflow-wrap: anywhere", html)
    pdf_path = tmp_path / "report.pdf"
    write_pdf(html, pdf_path)
    lines = [line for page in pypdf.PdfReader(pdf_path).pages for line in page.extract_text().splitlines()]
    assert any(line.endswith("v3.npz") for line in lines) and not any(name in line for line in lines)
    assert f"SHA-256 {'cd34' * 16}" not in lines  # the data table's row; the manifest's is full width


def _mnist(results: dict) -> dict:
    return {**results, "data": {**results["data"], "name": "mnist"}}


@pytest.mark.parametrize(("eps", "distortions", "eps_50", "sentence"), [
    ([0.1, 0.2, 0.3], [0.05, 0.082947, 0.15, None], 0.082947, "Robust accuracy falls to 50 % at or below ε = 0.083: "),
    ([0.5, 1.0], [0.3, 1.250246, 2.0, None], 1.250246,
     ("of half of the samples: beyond the audited ε, outside the threat model, robust accuracy falls to 50 % at "
      "or below ε = 1.26.")),
])
def test_eps_50_is_never_printed_below_its_value(results, eps, distortions, eps_50, sentence):
    """eps_50 = 0.082947 printed as 0.0829: at 0.0829 only 1 of 4 samples is
    broken, so "falls to 50 % at or below ε = 0.0829" was false."""
    _hard_label_at(results, eps, distortions, eps_50)

    text = build_view(results).distortion.eps_50

    assert sentence in text and "0.0829" not in text and "1.25 " not in text


def test_eps_50_at_an_audited_fraction_reads_as_that_fraction(results):
    """A fixed-ε attack's examples lie at its ε: 8/255 is stored rounded up
    to 0.031373, which reads 8/255 as every ε of the report does."""
    from auditor.report.build import _eps_50_shown

    _hard_label_at(results, [2 / 255, 8 / 255], [0.031373, 0.031373, None], 0.031373)
    results["robust_accuracy"] = {"0.00784314": 1.0, "0.0313725": 1 / 3}  # 0.031373 is within 8/255's bound

    assert "falls to 50 % at or below ε = 8/255: half" in build_view(results).distortion.eps_50
    for value in (0.082947, 1.250246, 0.1, 0.0999995, 123456.0, 1e-7):
        assert float(_eps_50_shown(value, [])) >= value


def test_refused_results_touch_nothing_in_the_folder(results, tmp_path):
    """Refused input is refused before anything is written: ``auditor report`` with a mistyped or
    hand-broken file must not delete the report of the scan whose folder it names."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("report.html", "report.pdf", "results.json"):
        (out / name).write_text("earlier")
    results["threat"]["norm"] = "l7"

    with pytest.raises(AuditError, match="threat.norm must be one of linf, l2"):
        write_report(results, out, source="results.json")

    assert {path.name: path.read_text() for path in out.iterdir()} == {
        name: "earlier" for name in ("report.html", "report.pdf", "results.json")
    }