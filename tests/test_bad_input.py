"""Bad input: one line on stderr, exit code 2, no traceback, no output files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from auditor.cli import main


class _NanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * torch.log(x.flatten(1)[:, :1] - 2)  # log(<0) = NaN


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _unconvertible(path: Path) -> Path:
    """An MNIST-shaped ONNX graph ending in Hardmax, which has no torch conversion."""
    from onnx import TensorProto, helper, numpy_helper, save

    weights = numpy_helper.from_array(np.random.RandomState(0).randn(784, 10).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["z"]),
         helper.make_node("Hardmax", ["z"], ["logits"])],
        "hardmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        initializer=[weights],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _onnx(module: nn.Module, shape, path: Path) -> Path:
    torch.onnx.export(module.eval(), (torch.rand(1, *shape),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 10)
    (root / "empty.onnx").write_bytes(b"")
    _onnx(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), (3, 32, 32), root / "rgb.onnx")
    _onnx(nn.Sequential(nn.Flatten(), nn.Linear(784, 5)), (1, 28, 28), root / "five.onnx")
    _onnx(_NanHead(), (1, 28, 28), root / "nan.onnx")
    _unconvertible(root / "hardmax.onnx")
    (root / "empty_dir").mkdir()
    np.savez(root / "no_y.npz", x=np.zeros((4, 1, 28, 28), np.float32))
    (root / "unknown_key.yaml").write_text("policy: p\nrequirements:\n  - clean_acuracy: {min: 0.5}\n")
    with open(root / "payload.pt", "wb") as stream:
        pickle.dump({"weights": _Payload(root / "PWNED")}, stream)
    return root


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    return exit_info.value.code, capsys.readouterr().err


CASES = {
    "corrupt model": (["scan", "{root}/corrupt.onnx"], "corrupt.onnx"),
    "empty model": (["scan", "{root}/empty.onnx"], "empty.onnx"),
    "input shape": (["scan", "{root}/rgb.onnx"], "(3, 32, 32)"),
    "class count": (["scan", "{root}/five.onnx"], "5 classes"),
    "nan outputs": (["scan", "{root}/nan.onnx"], "NaN"),
    "empty data folder": (["scan", "{example}", "--data", "{root}/empty_dir"], "no class folders"),
    "malformed npz": (["scan", "{example}", "--data", "{root}/no_y.npz"], "'y'"),
    "unknown policy key": (["scan", "{example}", "--policy", "{root}/unknown_key.yaml"], "clean_acuracy"),
    "eps zero": (["scan", "{example}", "--eps", "0"], "--eps must be > 0"),
    "eps negative": (["scan", "{example}", "--eps=-0.1"], "--eps must be > 0"),
    "mean not a number": (["scan", "{example}", "--mean", "a"], "Invalid value for --mean"),
    "std not finite": (["scan", "{example}", "--std", "nan"], "Invalid value for --std"),
    "unknown attack": (["scan", "{example}", "--attacks", "pgd-linf,nope"], "unknown attack 'nope'"),
    "empty attack list": (["scan", "{example}", "--attacks", ""], "--attacks names no attack"),
    "stronger access than the file allows": (["scan", "{root}/hardmax.onnx", "--access", "white-box"], "Hardmax"),
    "no surrogates at access none": (["scan", "{example}", "--access", "none"], "give --surrogate PATH"),
    "surrogate not found": (["scan", "{example}", "--surrogate", "{root}/missing.onnx"], "missing.onnx"),
    "corrupt surrogate": (["scan", "{example}", "--access", "none", "--surrogate", "{root}/corrupt.onnx"],
                          "corrupt.onnx"),
    "surrogate input shape": (["scan", "{example}", "--access", "none", "--surrogate", "{root}/rgb.onnx"],
                              "rgb.onnx: model expects input (3, 32, 32)"),
    "negative surrogate count": (["scan", "{example}", "--train-surrogates", "-1"], "--train-surrogates must be"),
    "unknown flag": (["scan", "{example}", "--frobnicate"], "--frobnicate"),
    "pickle payload": (["scan", "{root}/payload.pt", "--arch", "examples.mnist_cnn:build"], "--trust-pickle"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(case, artefacts, example_onnx, capsys, tmp_path):
    args, expected = CASES[case]
    args = [a.format(root=artefacts, example=example_onnx) for a in args] + ["--out", str(tmp_path / "out")]
    code, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("args", [["scan", "{root}/missing.onnx"], ["scan", "{example}", "--eps=-1"], ["--frobnicate"]])
def test_debug_shows_the_traceback_and_keeps_exit_code_2(args, artefacts, example_onnx, capsys):
    """--debug adds the traceback; the exit code stays 2 (it was 1, the
    code of a failed policy, so CI could not tell the two apart)."""
    code, err = run(capsys, "--debug", *(a.format(root=artefacts, example=example_onnx) for a in args))
    assert code == 2 and "Traceback" in err


def test_pickle_payload_never_runs(artefacts, capsys):
    code, _ = run(capsys, "scan", artefacts / "payload.pt", "--arch", "examples.mnist_cnn:build")
    assert code == 2
    assert not (artefacts / "PWNED").exists()


# --------------------------------------------------------------------------- #
# auditor check / auditor report on bad results files, unwritable outputs
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def scanned(example_onnx, tmp_path_factory):
    """A real results.json (a small hard-label scan), for editing copies of it."""
    from auditor import scan

    path = tmp_path_factory.mktemp("scanned") / "results.json"
    audit = scan(example_onnx, "mnist", access="hard-label", samples=10, budget=20, attacks=["sign-opt"])
    path.write_text(json.dumps(audit.results))
    return path


def _edited(scanned: Path, folder: Path, field: str, value) -> Path:
    """A copy of the scanned results.json with one top-level field set (or, with None, removed)."""
    results = json.loads(scanned.read_text())
    if value is None:
        del results[field]
    else:
        results[field] = value
    path = folder / "results.json"
    path.write_text(json.dumps(results))
    return path


BAD_RESULTS = {
    "clean accuracy a string": ("clean_accuracy", "high", "clean_accuracy must be a number in [0, 1], got 'high'"),
    "robust accuracy missing": ("robust_accuracy", None, "missing required field 'robust_accuracy'"),
    "robust accuracy above 1": ("robust_accuracy", {"0.1": 1.5}, "robust_accuracy['0.1'] must be a number in [0, 1]"),
    "threat without eps": ("threat", {"norm": "linf", "budget": 100}, "missing required field 'threat.eps'"),
    "threat eps not those of robust accuracy": (
        "threat", {"norm": "linf", "eps": [0.1]}, "robust_accuracy has ε ['0.1', '0.2', '0.3'] but threat.eps is ['0.1']"
    ),
    "attacks not a list": ("attacks", {"sign-opt-linf": {}}, "attacks must be a list"),
}


@pytest.mark.parametrize("case", BAD_RESULTS)
def test_check_rejects_bad_results_with_one_line(case, scanned, capsys, tmp_path):
    path = _edited(scanned, tmp_path, *BAD_RESULTS[case][:2])
    code, err = run(capsys, "check", path, "--policy", "strict", "--junit", tmp_path / "junit" / "junit.xml")
    assert code == 2
    assert err.startswith(f"error: {path}: {BAD_RESULTS[case][2]}") and err.count("\n") == 1, err
    assert not (tmp_path / "junit").exists()


@pytest.mark.parametrize("case", BAD_RESULTS)
def test_report_rejects_bad_results_and_creates_no_folder(case, scanned, capsys, tmp_path):
    path = _edited(scanned, tmp_path, *BAD_RESULTS[case][:2])
    code, err = run(capsys, "report", path, "--out", tmp_path / "out" / "report")
    assert code == 2
    assert err.startswith(f"error: {path}: {BAD_RESULTS[case][2]}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_scanned_results_pass_check_and_report(scanned, capsys, tmp_path):
    code, _ = run(capsys, "check", scanned, "--policy", "default")
    assert code in (0, 1)  # a verdict, not an error
    code, _ = run(capsys, "report", scanned, "--out", tmp_path / "out")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.pdf"]


@pytest.mark.parametrize("command", [["check", "--policy", "strict"], ["report", "--out", "{tmp}/out"]])
def test_missing_results_file_reads_no_such_file(command, capsys, tmp_path):
    missing = tmp_path / "missing.json"
    args = [command[0], missing, *(arg.format(tmp=tmp_path) for arg in command[1:])]
    code, err = run(capsys, *args)
    assert code == 2
    assert err == f"error: cannot read results.json: no such file: {missing}\n"
    assert not (tmp_path / "out").exists()


def test_duplicate_policy_key_is_one_line_exit_2(scanned, capsys, tmp_path):
    policy = tmp_path / "dup.yaml"
    policy.write_text("policy: p\nrequirements:\n  - clean_accuracy: {min: 0.5, min: 0.99}\n")
    code, err = run(capsys, "check", scanned, "--policy", policy)
    assert code == 2
    assert err == f"error: policy {policy}: invalid YAML: duplicate key 'min' (line 3, column 32)\n"


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A regular file: no folder can be created below it."""
    path = tmp_path / "a-file"
    path.write_text("")
    return path


@pytest.mark.parametrize("unwritable", ["{blocked}/out", "/proc/x"])
def test_unwritable_report_out_is_one_line_exit_2(unwritable, scanned, blocked, capsys):
    out = unwritable.format(blocked=blocked)
    if out.startswith("/proc") and not Path("/proc/self").exists():
        pytest.skip("no /proc")
    code, err = run(capsys, "report", scanned, "--out", out)
    assert code == 2
    assert err.startswith(f"error: cannot write to {out}: ") and err.count("\n") == 1, err
    assert "internal error" not in err


def test_unwritable_junit_is_one_line_exit_2(scanned, blocked, capsys):
    code, err = run(capsys, "check", scanned, "--policy", "default", "--junit", blocked / "junit.xml")
    assert code == 2
    assert err.startswith(f"error: cannot write to {blocked / 'junit.xml'}: ") and err.count("\n") == 1, err


def test_unwritable_scan_out_is_one_line_exit_2(example_onnx, blocked, capsys):
    out = blocked / "scan"
    code, err = run(capsys, "scan", example_onnx, "--access", "hard-label", "-n", "10", "--budget", "10",
                    "--attacks", "sign-opt", "--out", out)
    assert code == 2
    assert err.startswith(f"error: cannot write to {out}: ") and err.count("\n") == 1, err
    assert not out.exists()


def test_os_errors_elsewhere_are_not_called_write_errors(tmp_path):
    from auditor.cli import _output_error

    out = tmp_path / "out"
    unrelated = FileNotFoundError(2, "No such file or directory", str(tmp_path / "model.onnx"))
    assert _output_error(unrelated, [out]) is None
    inside = PermissionError(13, "Permission denied", str(out / ".partial-x" / "results.json"))
    assert str(_output_error(inside, [out])) == f"cannot write to {out}: Permission denied"


def test_bare_auditor_prints_its_help_and_exits_2(capsys):
    """No command is a usage error (exit 2) whose text is the help, not an 'error: Usage' line."""
    code, err = run(capsys)
    assert code == 2 and err.startswith("Usage: auditor") and "scan" in err
