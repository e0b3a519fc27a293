"""The HTML/PDF report: built from results.json alone, escaped, deterministic, atomic."""

from __future__ import annotations

import copy

import pypdf
import pytest
import weasyprint
from PIL import Image

from auditor.cli import _echo_summary
from auditor.errors import AuditError
from auditor.report.build import build_view, check_explanations
from auditor.report.render import render_html, write_pdf, write_report
from auditor.report.schema import validate_results


@pytest.fixture
def results() -> dict:
    """A complete ``auditor.results/1`` dict with a failed policy."""
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
                "robust_accuracy": {"0.1": 0.70, "0.2": 0.30, "0.3": 0.05},
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
                "robust_accuracy": {"0.1": 0.62, "0.2": 0.21, "0.3": 0.03},
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
    view = build_view(results)
    assert [row.eps for row in view.robust_rows] == ["2/255", "8/255"]
    assert "at ε=8/255 (L∞)" in view.verdict.summary
    assert {headline.label: headline.note for headline in view.headlines}["Robust accuracy"] == "at ε=8/255 (L∞)"
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
    """Neither a file nor the network: WeasyPrint skips each URL with a logged error."""
    image = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(image)
    html = (f'<p>text</p><img src="{image.as_uri()}"><img src="file:///etc/passwd">'
            '<link rel="stylesheet" href="http://127.0.0.1:1/style.css">')
    write_pdf(html, tmp_path / "report.pdf")
    page = pypdf.PdfReader(tmp_path / "report.pdf").pages[0]
    assert "text" in page.extract_text()
    assert not page.images
    for url in (image.as_uri(), "file:///etc/passwd", "http://127.0.0.1:1/style.css"):
        assert f"disallowed protocol: {url}" in caplog.text


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
    ("attacks.0.runs.0.eps", "abc", "attacks[0].runs[0].eps must be a number >= 0 or null, got 'abc'"),
    ("attacks.0.runs.0.broken", 100, "attacks[0].runs[0]: broken is 100, more than its 99 samples"),
    ("attacks.0.runs.0.success_curve.success_rate", ["x"],
     "attacks[0].runs[0].success_curve.success_rate[0] must be a number in [0, 1] or null, got 'x'"),
    ("attacks.0.runs.0.success_curve.queries", [1, 10],
     "attacks[0].runs[0].success_curve: its lists differ in length (queries 2, success_rate 5)"),
    ("attacks.1.runs.0.distortion_at_queries.median", [None, "3.1", 2.25],
     "attacks[1].runs[0].distortion_at_queries.median[1] must be a number >= 0 or null, got '3.1'"),
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
    results["data"]["n"] = 1
    results["samples"] = [{**results["samples"][0], "distortion": 3.333366}]
    assert validate_results(results) is results


def test_robust_accuracy_must_agree_with_the_samples_when_all_are_listed(results):
    """With every sample listed, robust accuracy at ε is the share whose
    distortion is none or above ε: 2 of 3 at 0.1 (a hand-edited 0.99 was
    rendered beside the samples' counts)."""
    results["data"]["n"] = 3
    results["robust_accuracy"] = {"0.1": 2 / 3, "0.2": 2 / 3, "0.3": 1 / 3}
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
    assert view.attacks[0].params == "norm=linf, resize=1.10368"
    assert view.attacks[-1].budget == "1 (its verification)" and view.attacks[0].budget == "2,000"


def test_the_model_section_names_the_architecture_and_its_source_hash(results):
    """Weights files are identified by their weights and by the code that
    builds the network; the report shows both when the results have them."""
    assert "Architecture" not in [field.label for field in build_view(results).model]
    results["model"].update(arch="examples.mnist_cnn:build", arch_sha256="ab" * 32)
    fields = {field.label: field.value for field in build_view(results).model}
    assert fields["Architecture"] == "examples.mnist_cnn:build" and fields["Architecture SHA-256"] == "ab" * 32


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
    results["samples"] = [{**results["samples"][0], "index": number, "distortion": distortion}
                          for number, distortion in enumerate(distortions)]
    results["data"]["n"] = len(distortions)
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
                                            "probabilities, not logits.")
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
    "unlimited"); the threat model says which attacks the budget limits."""
    def budget() -> str:
        return {field.label: field.value for field in build_view(results).threat}["Query budget"]

    assert budget() == "2,000 queries per sample for each soft- and hard-label attack"
    results["attacks"][1].update(access="white-box")
    assert budget() == ("2,000 queries per sample for each soft- and hard-label attack; the white-box attacks "
                        "are not limited by it")
    results["attacks"][0].update(access="white-box")
    assert budget() == "not used: no soft- or hard-label attack ran"
