"""End to end: `auditor scan` from the example ONNX model to verified outputs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from pypdf import PdfReader

from auditor.cli import main
from auditor.eps import eps_at_half
from auditor.verify import eps_bound

BUDGET = 2000


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    return exit_info.value.code


@pytest.fixture(scope="module")
def hard_label_scan(tmp_path_factory, example_onnx) -> Path:
    """The issue's headline command, run once for the tests of this module."""
    out = tmp_path_factory.mktemp("scan")
    code = run_cli("scan", example_onnx, "--access", "hard-label", "--data", "mnist",
                   "-n", "100", "--budget", str(BUDGET), "--out", out)
    assert code == 0
    return out


def test_scan_writes_results_and_reports(hard_label_scan):
    for name in ("results.json", "report.html", "report.pdf", "adversarials.npz"):
        assert (hard_label_scan / name).stat().st_size > 0
    assert not list(hard_label_scan.glob(".partial-*"))
    results = json.loads((hard_label_scan / "results.json").read_text())
    assert results["schema"] == "auditor.results/1"
    assert results["access"] == {"level": "hard-label", "reason": "requested with --access hard-label"}
    assert [a["name"] for a in results["attacks"]] == ["sign-opt-linf", "hop-skip-jump-linf", "random-noise-linf"]
    assert len(results["samples"]) == 100 and results["data"]["n"] == 100
    assert all(sample["queries"] <= BUDGET for sample in results["samples"])
    assert results["attacks"][0]["queries"]["max"] <= BUDGET
    # robust accuracy is derived from the per-sample records
    for eps, value in results["robust_accuracy"].items():
        robust = [s["distortion"] is None or s["distortion"] > eps_bound(float(eps)) for s in results["samples"]]
        assert value == pytest.approx(np.mean(robust))
    samples = results["samples"]
    assert results["clean_accuracy"] == pytest.approx(np.mean([s["label"] == s["clean_pred"] for s in samples]))
    # per-attack statistics agree with the per-run records
    attack = results["attacks"][0]
    (run,) = attack["runs"]
    assert attack["samples"] == run["samples"] == sum(s["broken_by"] != "clean" for s in samples)
    assert attack["success_rate"] == pytest.approx(sum(run["per_sample"]["success"]) / attack["samples"], abs=1e-6)
    reached = [q for q, ok in zip(run["per_sample"]["reached"], run["per_sample"]["success"]) if ok]
    assert attack["queries"]["median"] == np.median(reached)
    assert attack["queries"]["measure"] == "to-success"
    # HopSkipJump (L∞) attacks every sample Sign-OPT left robust at the smallest ε, and only those
    hsj = set(results["attacks"][1]["runs"][0]["per_sample"]["index"])
    left = {i for i, ok in zip(run["per_sample"]["index"], run["per_sample"]["success"]) if not ok}
    assert left <= hsj
    smallest = min(results["threat"]["eps"])
    done = {s["index"] for s in samples if s["broken_by"] == "sign-opt-linf" and s["distortion"] <= smallest + 1e-6}
    assert not hsj & done and hsj - left
    # a standard CNN is not robust at eps=0.3 against a label-only attacker
    assert results["robust_accuracy"]["0.3"] < 0.5


def test_every_counted_example_reverifies_on_a_fresh_onnx_session(hard_label_scan, example_onnx, mnist_test):
    results = json.loads((hard_label_scan / "results.json").read_text())
    adversarials = np.load(hard_label_scan / "adversarials.npz")
    session = onnxruntime.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    x_adv = adversarials["x_adv"]
    predicted = session.run(None, {session.get_inputs()[0].name: x_adv})[0].argmax(1)
    index = adversarials["index"]
    labels = mnist_test.y.numpy()[index]
    assert (predicted != labels).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    linf = np.abs(x_adv - mnist_test.x.numpy()[index]).reshape(len(index), -1).max(1)
    np.testing.assert_allclose(linf, adversarials["distortion"], rtol=1e-5, atol=1e-6)
    # every sample counted as broken at some eps has its verified example saved
    broken = {s["index"] for s in results["samples"] if s["distortion"] not in (None, 0.0)}
    assert broken == set(index.tolist())


def test_policy_gate_exit_codes_and_junit(hard_label_scan, tmp_path):
    results = hard_label_scan / "results.json"
    junit = tmp_path / "j.xml"
    assert run_cli("check", results, "--policy", "policies/strict.yaml", "--junit", junit) == 1
    import xml.etree.ElementTree as ET

    cases = ET.parse(junit).getroot().findall("testcase")
    assert len(cases) == 4  # one per requirement of strict.yaml
    assert any(case.find("failure") is not None for case in cases)
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("policy: lenient\nrequirements:\n  - clean_accuracy: {min: 0.9}\n")
    assert run_cli("check", results, "--policy", lenient) == 0


def test_pdf_shows_verdict_and_robust_accuracy_table(hard_label_scan):
    results = json.loads((hard_label_scan / "results.json").read_text())
    text = " ".join(page.extract_text() for page in PdfReader(hard_label_scan / "report.pdf").pages)
    assert "NOT GATED" in text
    assert f"{results['robust_accuracy']['0.3']:.1%}".replace("%", " %") in text or \
        f"{results['robust_accuracy']['0.3'] * 100:.1f}" in text


def test_report_rerenders_from_results_alone(hard_label_scan, tmp_path):
    assert run_cli("report", hard_label_scan / "results.json", "--out", tmp_path / "again") == 0
    assert (tmp_path / "again" / "report.pdf").stat().st_size > 0


def test_same_seed_gives_identical_results(example_onnx, tmp_path):
    def results(out):
        assert run_cli("scan", example_onnx, "--access", "soft-label", "-n", "20", "--budget", "200",
                       "--seed", "7", "--out", out) == 0
        data = json.loads((out / "results.json").read_text())
        for key in ("started", "seconds"):
            data.pop(key)
        for attack in data["attacks"]:
            attack.pop("seconds")
        return data

    first, second = results(tmp_path / "a"), results(tmp_path / "a")  # the same command twice
    assert first == second
    assert [a["name"] for a in first["attacks"]] == [
        "square-linf", "nes-linf", "genattack-linf", "hop-skip-jump-linf", "random-noise-linf"
    ]


def test_demo_records_its_own_command_line(example_onnx, tmp_path):
    args = ["demo", "-n", "1", "--model", str(example_onnx), "--out", str(tmp_path / "demo")]
    assert run_cli(*args) == 0
    manifest = json.loads((tmp_path / "demo" / "results.json").read_text())["manifest"]
    assert manifest["command"] == shlex.join(["auditor", *args])


def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    proc = subprocess.run(
        [sys.executable, "-m", "auditor", "scan", str(bad), "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_attacks_command_lists_every_attack_with_its_modes(capsys):
    from auditor.attacks import CATALOGUE

    assert run_cli("attacks") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:7] == ["name", "access", "norm", "kind", "default", "targeted", "paper"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {attack.label for attack in CATALOGUE}
    assert " own level " in rows["nes-linf"] and " no " in rows["pgd-linf"]
    assert " to soft-label " in rows["hop-skip-jump-l2"] and " yes " in rows["square-l2"]
    assert rows["square-l2"].split()[5] == "yes" and rows["apgd-ce-linf"].split()[5] == "no"


def test_min_norm_distortion_checkpoints_and_eps_50(hard_label_scan):
    results = json.loads((hard_label_scan / "results.json").read_text())
    (run,) = results["attacks"][0]["runs"]
    curve = run["distortion_at_queries"]
    assert curve["queries"] == sorted(curve["queries"]) and curve["queries"][-1] == BUDGET
    medians = [m for m in curve["median"] if m is not None]
    assert medians and medians == sorted(medians, reverse=True)  # more queries, never farther
    assert curve["found"] == sorted(curve["found"])
    # the ε where robust accuracy falls to 50 %: half or more broken there, fewer just below
    records = np.array([np.inf if s["distortion"] is None else s["distortion"] for s in results["samples"]])
    eps_50 = results["eps_50"]
    if eps_50 is None:
        assert 2 * np.isfinite(records).sum() < len(records)
    else:
        assert 2 * (records <= eps_50 + 1e-6).sum() >= len(records) > 2 * (records < eps_50 - 1e-6).sum()
    text = " ".join(page.extract_text() for page in PdfReader(hard_label_scan / "report.pdf").pages)
    assert "Distortion against queries" in " ".join(text.split())


@pytest.mark.parametrize("records, expected", [
    ([0.0, 0.1, 0.2, 0.3], 0.1),  # robust accuracy 50 % at 0.1
    ([0.1, 0.2, np.inf, np.inf], 0.2),  # exactly half broken
    ([0.1, np.inf, np.inf], None),  # more than half never broken
    ([0.3, 0.1, 0.2], 0.2),
])
def test_eps_50_is_where_half_of_the_samples_are_broken(records, expected):
    assert eps_at_half(torch.tensor(records)) == expected


def test_min_norm_queries_to_success_are_read_from_the_trace(hard_label_scan):
    """A minimum-norm attack keeps refining until its budget is spent; its
    queries to success are those it had spent when its example first came
    within the largest ε, not the budget."""
    results = json.loads((hard_label_scan / "results.json").read_text())
    timed = [attack for attack in results["attacks"] if attack["kind"] == "min-norm"]
    assert timed
    for attack in timed:
        (run,) = attack["runs"]
        per_sample = run["per_sample"]
        assert attack["queries"]["measure"] == "to-success"
        assert all(0 < reached <= spent for reached, spent in zip(per_sample["reached"], per_sample["queries"]))
        to_success = [q for q, ok in zip(per_sample["reached"], per_sample["success"]) if ok]
        assert run["queries_to_success"]["median"] == pytest.approx(float(np.median(to_success)))
        assert attack["queries"]["median"] == pytest.approx(float(np.median(to_success)))
        assert attack["queries"]["median"] < BUDGET / 2  # spent would be about the budget


def test_outputs_replace_a_stale_junit_and_a_failure_leaves_no_folder(hard_label_scan, tmp_path):
    from auditor.errors import AuditError
    from auditor.scan import AuditResult, write_outputs

    results = json.loads((hard_label_scan / "results.json").read_text())
    out = tmp_path / "again"
    out.mkdir()
    (out / "junit.xml").write_text("<testsuites><testsuite name='an earlier policy' failures='1'/></testsuites>")
    write_outputs(AuditResult(results=results, adversarials={}), out)  # no policy this time
    assert sorted(path.name for path in out.iterdir()) == ["adversarials.npz", "report.html", "report.pdf",
                                                           "results.json"]
    broken = dict(results)
    del broken["robust_accuracy"]
    with pytest.raises((KeyError, AuditError)):  # the report cannot be built
        write_outputs(AuditResult(results=broken, adversarials={}), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_an_out_that_cannot_be_written_is_refused_before_the_scan(example_onnx, tmp_path):
    import auditor
    from auditor.errors import AuditError

    (tmp_path / "afile").write_text("")
    with pytest.raises(AuditError, match=r"cannot write to .*afile/sub: .*afile is not a folder"):
        auditor.scan(example_onnx, "nonexistent-data", out=tmp_path / "afile" / "sub")  # before the data is read
    (tmp_path / "out" / "report.pdf").mkdir(parents=True)
    with pytest.raises(AuditError, match=r"cannot write to .*report.pdf: it is a folder"):
        auditor.scan(example_onnx, "nonexistent-data", out=tmp_path / "out")


def test_an_audit_reads_as_pandas_frames(hard_label_scan):
    """For a notebook: one row per sample (with robust@ε columns whose means are the robust
    accuracies) and one row per attack, built from results.json alone."""
    from auditor.scan import AuditResult

    results = json.loads((hard_label_scan / "results.json").read_text())
    audit = AuditResult(results=results, adversarials={})
    samples = audit.samples_frame()
    assert list(samples.index) == [sample["index"] for sample in results["samples"]]
    assert samples["distortion"].isna().sum() == sum(sample["distortion"] is None for sample in results["samples"])
    for key, value in results["robust_accuracy"].items():
        assert samples[f"robust@{key}"].mean() == pytest.approx(value, abs=1e-6)
    attacks = audit.attacks_frame()
    assert list(attacks.index) == [attack["name"] for attack in results["attacks"]]
    for attack in results["attacks"]:
        row = attacks.loc[attack["name"]]
        assert (row["success_rate"], row["queries_total"]) == (attack["success_rate"], attack["queries"]["total"])
        assert (row["queries_measure"], row["kind"]) == (attack["queries"]["measure"], attack["kind"])


def test_a_failed_move_puts_the_earlier_run_back(hard_label_scan, tmp_path, monkeypatch):
    """Outputs move in one by one; when one move fails, those already moved
    are taken out and the earlier run's files are back as they were."""
    from auditor.scan import AuditResult, write_outputs

    results = json.loads((hard_label_scan / "results.json").read_text())
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.json", "report.html", "report.pdf", "adversarials.npz"):
        (out / name).write_text(f"earlier {name}")
    real = Path.replace

    def failing(self, target):
        if self.name == "report.pdf" and self.parent.name.startswith(".partial-"):  # the new one
            raise OSError(28, "No space left on device", str(target))
        return real(self, target)

    monkeypatch.setattr(Path, "replace", failing)
    with pytest.raises(OSError):
        write_outputs(AuditResult(results=results, adversarials={}), out)
    assert {path.name: path.read_text() for path in out.iterdir()} == {
        name: f"earlier {name}" for name in ("results.json", "report.html", "report.pdf", "adversarials.npz")
    }


def test_a_failed_move_of_folders_puts_the_earlier_ones_back(tmp_path, monkeypatch):
    """``auditor harden`` moves its before/ and after/ scan folders in the same way: it used to
    delete the earlier folder first, so a failure further on lost the earlier run."""
    from auditor.scan import move_into_place

    stage, out = tmp_path / ".partial-x", tmp_path / "out"
    for root, text in ((stage, "new"), (out, "earlier")):
        (root / "before").mkdir(parents=True)
        (root / "before" / "results.json").write_text(text)
        (root / "hardening.json").write_text(text)
    real = Path.replace

    def failing(self, target):
        if self.name == "hardening.json" and self.parent == stage:
            raise OSError(28, "No space left on device", str(target))
        return real(self, target)

    monkeypatch.setattr(Path, "replace", failing)
    with pytest.raises(OSError):
        move_into_place(stage, out, ["before", "hardening.json"])
    assert (out / "before" / "results.json").read_text() == "earlier"
    assert (out / "hardening.json").read_text() == "earlier"
    assert sorted(path.name for path in out.iterdir()) == ["before", "hardening.json"]


def test_results_record_the_architecture_and_normalisation_and_a_narrowed_battery():
    import auditor

    audit = auditor.scan("examples/mnist_cnn.safetensors", "mnist", arch="examples.mnist_cnn:build",
                         mean=(0.1,), std=(0.9,), access="hard-label", attacks=["random-noise"],
                         samples=10, budget=5, eps=0.1)
    import hashlib

    model = audit.results["model"]
    assert model["arch"] == "examples.mnist_cnn:build"
    # the code that builds the network is identified too: same weights, edited module, other hash
    assert model["arch_sha256"] == hashlib.sha256(Path("examples/mnist_cnn.py").read_bytes()).hexdigest()
    assert model["normalisation"] == {"mean": [0.1], "std": [0.9]}
    ids = {check["id"] for check in audit.results["checks"]}
    assert "custom-battery" in ids and "noise-beats-attacks" not in ids  # noise alone has nothing to beat


def test_more_samples_than_the_data_has_are_said(example_onnx, tmp_path, caplog):
    import auditor
    from auditor.data.builtin import mnist

    digits = mnist("test")
    path = tmp_path / "digits.npz"
    np.savez(path, x=digits.x[:6].numpy(), y=digits.y[:6].numpy())
    audit = auditor.scan(example_onnx, str(path), access="hard-label", attacks=["random-noise"], budget=5,
                         samples=500)
    assert audit.results["data"]["n"] == 6
    assert "-n 500: the data has 6 images; all of them are audited" in caplog.text


def test_scan_refuses_a_budget_that_is_not_an_integer_before_it_runs(example_onnx):
    import auditor
    from auditor.errors import AuditError

    with pytest.raises(AuditError, match="--budget must be an integer, got 50.5"):
        auditor.scan(example_onnx, "mnist", budget=50.5)


def test_default_radii_come_from_the_image_shape_whatever_the_data_source(example_onnx, tmp_path):
    import auditor
    from auditor.data.builtin import mnist

    digits = mnist("test")
    path = tmp_path / "digits.npz"
    np.savez(path, x=digits.x[:10].numpy(), y=digits.y[:10].numpy())
    audit = auditor.scan(example_onnx, str(path), access="hard-label", attacks=["random-noise"], budget=5)
    assert audit.results["threat"]["eps"] == [0.1, 0.2, 0.3]  # MNIST's radii, not 2/255 ... 8/255


def test_attacks_that_cannot_take_a_step_within_the_budget_are_skipped_and_said(example_onnx):
    """NES needs 2q+1 = 29 queries per step on 28 x 28 digits, GenAttack one
    population (6): under --budget 20 NES is skipped with an attack-skipped
    check rather than reported as run and failed; when every chosen attack
    is too costly the scan refuses to start."""
    from auditor import scan
    from auditor.attacks.softlabel.gen_attack import GenAttack
    from auditor.attacks.softlabel.nes import NES
    from auditor.errors import AuditError

    assert NES().step_cost((1, 28, 28)) == 29 and GenAttack().step_cost((1, 28, 28)) == 6
    audit = scan(example_onnx, "mnist", access="soft-label", samples=8, eps=[0.3], budget=20)
    assert {attack["name"] for attack in audit.results["attacks"]} == {
        "square-linf", "genattack-linf", "hop-skip-jump-linf", "random-noise-linf"
    }
    skipped = [check["message"] for check in audit.results["checks"] if check["id"] == "attack-skipped"]
    assert skipped == ["nes-linf was not run: one step needs 29 queries per sample; the budget is 20"]
    with pytest.raises(AuditError, match=r"no attack chosen can run \(nes-linf: one step needs 29 queries per sample; the budget is 20\)"):
        scan(example_onnx, "mnist", access="soft-label", samples=8, eps=[0.3], budget=20, attacks=["nes"])


def test_attacks_whose_loss_needs_more_classes_than_the_model_has_are_skipped_and_said(tmp_path):
    """APGD-DLR's loss needs 3 classes: on a 2-class model a battery naming
    it runs without it and says so, and one of APGD-DLR alone is refused.
    APGD-T's loss (the margin below 4 classes) runs on any classifier: the
    default white-box battery of a 3-class model skips nothing."""
    import auditor
    from auditor.data.builtin import mnist
    from auditor.errors import AuditError

    digits = mnist("test")
    for classes in (2, 3):
        keep = digits.y < classes
        np.savez(tmp_path / f"d{classes}.npz", x=digits.x[keep][:12].numpy(), y=digits.y[keep][:12].numpy())
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, classes))
        torch.jit.trace(module, torch.zeros(1, 1, 28, 28)).save(str(tmp_path / f"m{classes}.pt"))
    audit = auditor.scan(str(tmp_path / "m3.pt"), str(tmp_path / "d3.npz"), access="white-box", eps=[0.1], budget=30)
    names = {attack["name"] for attack in audit.results["attacks"]}
    assert {"apgd-ce-linf", "apgd-t-linf"} <= names
    assert "attack-skipped" not in {check["id"] for check in audit.results["checks"]}
    audit = auditor.scan(str(tmp_path / "m2.pt"), str(tmp_path / "d2.npz"), access="white-box", eps=[0.1],
                         budget=30, attacks=["apgd-dlr", "fgsm"])
    assert [attack["name"] for attack in audit.results["attacks"]] == ["fgsm-linf"]
    skipped = [check["message"] for check in audit.results["checks"] if check["id"] == "attack-skipped"]
    assert skipped == ["apgd-dlr-linf was not run: its loss needs at least 3 classes; the model has 2"]
    with pytest.raises(AuditError, match=r"apgd-dlr-linf: its loss needs at least 3 classes; the model has 2"):
        auditor.scan(str(tmp_path / "m2.pt"), str(tmp_path / "d2.npz"), access="white-box", eps=[0.1], attacks=["apgd-dlr"])


def test_a_string_is_one_attack_list_or_one_surrogate(example_onnx):
    import auditor

    audit = auditor.scan(example_onnx, "mnist", access="white-box", attacks="fgsm, pgd", eps=0.1, samples=4,
                         surrogates=str(example_onnx))
    assert [attack["name"] for attack in audit.results["attacks"]][:2] == ["fgsm-linf", "pgd-linf"]
    assert [surrogate["source"] for surrogate in audit.results["transfer"]["surrogates"]] == [str(example_onnx)]


@pytest.mark.parametrize("overrides, message", [
    ({"samples": "10"}, "-n/--samples must be an integer, got '10'"),
    ({"samples": 2.5}, "-n/--samples must be an integer, got 2.5"),
    ({"mean": "0.5"}, "--mean must be a number or a sequence of numbers"),
    ({"data": (np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, int))}, "data must be mnist, the path of a .npz"),
    ({"model": torch.nn.Flatten()}, "model must be the path of a model file, got Flatten"),
    ({"device": "tpu"}, "--device tpu: "),
    ({"attacks": 5}, "attacks must be attack names (a list, or one string 'a,b'), got 5"),
    ({"attacks": ["fgsm", None]}, "attacks must be attack names (a list, or one string 'a,b'), got ['fgsm', None]"),
    ({"target": 3.5}, "--target must be random, least-likely or a class index, got 3.5"),
    ({"target": True}, "--target must be random, least-likely or a class index, got True"),
    ({"train_surrogates": "2"}, "--train-surrogates must be an integer, got '2'"),
    ({"surrogates": 5}, "surrogates must be model paths (a list, or one path), got 5"),
    ({"policy": {"requires": []}}, "--policy must be a path, got {'requires': []}"),
    ({"out": 5}, "--out must be a path, got 5"),
])
def test_bad_api_values_are_audit_errors(example_onnx, overrides, message):
    import auditor
    from auditor.errors import AuditError

    arguments = {"model": example_onnx, "data": "mnist", "attacks": ["fgsm"], "eps": 0.1, "samples": 4, **overrides}
    with pytest.raises(AuditError, match=re.escape(message)):
        auditor.scan(**arguments)


def test_a_single_mean_is_one_value_for_every_channel_and_robust_accuracy_reads_by_eps(example_onnx):
    import auditor
    from auditor.errors import AuditError

    audit = auditor.scan(example_onnx, "mnist", attacks="fgsm", eps=["8/255", 0.1], samples=4, mean=0.0)
    assert audit.results["model"]["normalisation"] == {"mean": [0.0], "std": [1.0]}
    assert audit.robust_accuracy_at("8/255") == audit.robust_accuracy_at(8 / 255) == audit.robust_accuracy["0.0313725"]
    with pytest.raises(AuditError, match="eps 0.2 was not audited; audited: 0.0313725, 0.1"):
        audit.robust_accuracy_at(0.2)


def test_scan_documents_every_parameter():
    import inspect

    import auditor

    documented = auditor.scan.__doc__.split("Parameters\n    ----------\n")[1].split("Returns\n")[0]
    names = {name for line in documented.splitlines() if " : " in line and not line.startswith(" " * 8)
             for name in line.split(" : ")[0].strip().split(", ")}
    assert names == set(inspect.signature(auditor.scan).parameters)
    assert "AuditError" in auditor.scan.__doc__.split("Raises\n")[1]


def test_a_randomised_model_gives_the_same_results_for_a_seed(tiny_cnn, tmp_path):
    """A program exported in training mode keeps its dropout on: it draws from torch's
    global generator, which each run of a scan seeds; its clean accuracy changed from run to run."""
    import auditor

    network = torch.nn.Sequential(tiny_cnn, torch.nn.Dropout(0.5)).train()
    path = tmp_path / "dropout.pt2"
    torch.export.save(torch.export.export(network, (torch.rand(4, 1, 28, 28),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    first, second = (auditor.scan(path, samples=16, eps=[0.1], attacks=["fgsm", "pgd"]).results for _ in range(2))
    assert "randomised-model" in {check["id"] for check in first["checks"]}
    assert first["samples"] == second["samples"] and first["clean_accuracy"] == second["clean_accuracy"]


def test_min_norm_runs_give_their_query_cost_at_every_eps(hard_label_scan):
    """A minimum-norm run serves every ε: its success at ε against queries
    comes from the trace, and agrees with the verified records."""
    results = json.loads((hard_label_scan / "results.json").read_text())
    records = np.array([np.inf if s["distortion"] is None else s["distortion"] for s in results["samples"]])
    by_index = {s["index"]: i for i, s in enumerate(results["samples"])}
    for attack in (a for a in results["attacks"] if a["kind"] == "min-norm"):
        (run,) = attack["runs"]
        entries = run["success_by_eps"]
        assert [e["eps"] for e in entries] == sorted(results["threat"]["eps"], reverse=True)
        assert entries[0]["broken"] == run["broken"]  # the largest ε: the run's own count
        assert entries[0]["queries_to_success"] == run["queries_to_success"]  # and its own statistics
        assert [e["broken"] for e in entries] == sorted((e["broken"] for e in entries), reverse=True)
        for entry in entries:
            curve = entry["success_curve"]
            assert curve["queries"][-1] == BUDGET and curve["success_rate"] == sorted(curve["success_rate"])
            assert curve["success_rate"][-1] == pytest.approx(entry["broken"] / run["samples"], abs=1e-6)
            # a sample the run broke within ε is broken there in the records too
            mine = [by_index[i] for i in run["per_sample"]["index"]]
            assert (records[mine] <= entry["eps"] + 1e-5).sum() >= entry["broken"]
            assert entry["queries_to_success"]["median"] < BUDGET
        # each sample's own trace: one value per checkpoint, never growing
        trace = run["distortion_at_queries"]
        assert len(trace["per_sample"]) == run["samples"]
        for values in trace["per_sample"]:
            assert len(values) == len(trace["queries"])
            found = [v for v in values if v is not None]
            assert found == sorted(found, reverse=True) and values[len(values) - len(found):] == found
    text = " ".join(page.extract_text() for page in PdfReader(hard_label_scan / "report.pdf").pages)
    assert re.search(r"hop-skip-jump-linf 0\.1 \d+ \d+\.\d %", " ".join(text.split()))  # its query row at ε = 0.1
