"""Bad input: one line on stderr, exit code 2, no traceback, no output files."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from auditor.cli import main
from helpers import baked_batch_onnx


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


class _Picky(nn.Module):
    """A classifier that fails on any pixel between two 8-bit levels, as an attack's are."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        levels = x * 255
        if bool((levels - levels.round()).abs().max() > 1e-3):
            raise RuntimeError("pixels between 8-bit levels")
        return self.net(x)


class _NanOnBright(nn.Module):
    """Logits of a linear layer, NaN for images brighter than 0.5 on average."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        bright = x.flatten(1).mean(1, keepdim=True) > 0.5
        return torch.where(bright, torch.full_like(self.fc(x.flatten(1)), float("nan")), self.fc(x.flatten(1)))


class _ChannelMean(nn.Module):
    """Takes any number of channels (their mean): nothing about it says how many the data has."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.mean(1).flatten(1))


class _InPlace(nn.Module):
    """Runs forward, but its backward fails: an in-place add overwrites the
    sigmoid output that the sigmoid's backward needs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        h = torch.sigmoid(x.flatten(1))
        h += 0
        return self.fc(h)


def _pt2_variants(root: Path) -> None:
    """A .pt2 whose sample inputs are a pickle payload (creating ``root/PWNED_PT2``
    when unpickled) and one with an operator torch does not know."""
    import io
    import zipfile

    good = root / "linear.pt2"
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    torch.export.save(torch.export.export(net, (torch.rand(2, 1, 28, 28),)), str(good))
    payload = io.BytesIO()
    torch.save(_Payload(root / "PWNED_PT2"), payload)
    with zipfile.ZipFile(good) as original:
        members = [(info.filename, original.read(info.filename)) for info in original.infolist()]
    for name, edit in (("payload.pt2", lambda member, data: payload.getvalue() if member.endswith("model.pt") else data),
                       ("unknown_op.pt2", lambda member, data: data.replace(b"aten.linear", b"aten.nosuchop"))):
        with zipfile.ZipFile(root / name, "w") as copy:
            for member, data in members:
                copy.writestr(member, edit(member, data))


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


def _classifier_tail(path: Path, tail: list, outputs: list) -> Path:
    """An MNIST-shaped linear ONNX classifier making ``logits`` (N,10), then the ``tail`` nodes."""
    from onnx import TensorProto, helper, numpy_helper, save

    weights = numpy_helper.from_array(np.random.RandomState(0).randn(784, 10).astype(np.float32), "w")
    column = numpy_helper.from_array(np.array([-1, 10, 1, 1], np.int64), "column")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"]), *tail],
        "tail",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])],
        outputs,
        initializer=[weights, column],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]
    save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))
    return path


def _squeezed(path: Path) -> Path:
    """Ends in a Squeeze without axes (PyTorch's ``x.squeeze()``): (10,) for one image."""
    from onnx import TensorProto, helper

    tail = [helper.make_node("Reshape", ["logits", "column"], ["column_logits"]),
            helper.make_node("Squeeze", ["column_logits"], ["scores"])]
    return _classifier_tail(path, tail, [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 10])])


def _zipmap(path: Path) -> Path:
    """sklearn-onnx's default outputs: an int64 label, then a ZipMap of the probabilities."""
    from onnx import TensorProto, helper

    tail = [helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
            helper.make_node("ZipMap", ["probabilities"], ["zipped"], domain="ai.onnx.ml",
                             classlabels_int64s=list(range(10)))]
    sequence = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["n"]),
               helper.make_value_info("zipped", sequence)]
    return _classifier_tail(path, tail, outputs)


def _onnx(module: nn.Module, shape, path: Path) -> Path:
    torch.onnx.export(module.eval(), (torch.rand(1, *shape),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory, tiny_cnn):
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 10)
    (root / "empty.onnx").write_bytes(b"")
    _onnx(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), (3, 32, 32), root / "rgb.onnx")
    _onnx(nn.Sequential(nn.Flatten(), nn.Linear(784, 5)), (1, 28, 28), root / "five.onnx")
    _onnx(_NanHead(), (1, 28, 28), root / "nan.onnx")
    _unconvertible(root / "hardmax.onnx")
    _squeezed(root / "squeezed.onnx")
    _zipmap(root / "zipmap.onnx")
    (root / "empty_dir").mkdir()
    np.savez(root / "no_y.npz", x=np.zeros((4, 1, 28, 28), np.float32))
    (root / "unknown_key.yaml").write_text("policy: p\nrequirements:\n  - clean_acuracy: {min: 0.5}\n")
    with open(root / "payload.pt", "wb") as stream:
        pickle.dump({"weights": _Payload(root / "PWNED")}, stream)
    _pt2_variants(root)
    torch.jit.save(torch.jit.trace(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), torch.rand(1, 1, 28, 28)),
                   str(root / "script.pt2"))
    baked_batch_onnx(root / "batch16.onnx")
    torch.jit.save(torch.jit.script(_Picky(tiny_cnn)), str(root / "picky.pt"))
    torch.jit.save(torch.jit.script(_NanOnBright()), str(root / "nan_bright.pt"))
    np.savez(root / "dark_then_bright.npz", x=np.concatenate([np.full((16, 28, 28), 20, np.uint8),
                                                              np.full((4, 28, 28), 200, np.uint8)]), y=np.arange(20) % 10)
    torch.jit.save(torch.jit.script(_ChannelMean()), str(root / "any_channels.pt"))
    torch.jit.save(torch.jit.script(_InPlace()), str(root / "inplace.pt"))
    torch.save(tiny_cnn.state_dict(), root / "tiny.pth")
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
                              "rgb.onnx expects input (3, 32, 32) but data mnist has (1, 28, 28)"),
    "surrogate weights file": (["scan", "{example}", "--access", "none", "--surrogate", "{root}/tiny.pth"],
                               "a surrogate must be a model file with its own architecture"),
    "negative surrogate count": (["scan", "{example}", "--train-surrogates", "-1"], "--train-surrogates must be"),
    "unknown flag": (["scan", "{example}", "--frobnicate"], "--frobnicate"),
    "pickle payload": (["scan", "{root}/payload.pt", "--arch", "examples.mnist_cnn:build"], "--trust-pickle"),
    "pickle payload in a .pt2": (["scan", "{root}/payload.pt2"], "payload.pt2 contains pickled code/objects"),
    "TorchScript named .pt2": (["scan", "{root}/script.pt2"], "its archive has no archive_format record"),
    ".pt2 torch cannot read": (["scan", "{root}/unknown_op.pt2"], "failed to resolve torch.ops.aten.nosuchop"),
    "batch size fixed inside the graph": (["scan", "{root}/batch16.onnx"], "fails on a batch of 3"),
    "outputs (K,) for a single image": (["scan", "{root}/squeezed.onnx"],
                                        "fails on a single image (a squeeze() that drops the batch dimension?): its output 'scores' has shape (10,)"),
    "single image at soft-label": (["scan", "{root}/squeezed.onnx", "--access", "soft-label", "-n", "4"],
                                   "fails on a single image"),
    "ZipMap probabilities": (["scan", "{root}/zipmap.onnx"], "convert the model without it (sklearn-onnx: options "
                             "{'zipmap': False})"),
    "model fails in the middle of the battery": (
        ["scan", "{root}/picky.pt", "--access", "hard-label", "--attacks", "sign-opt", "-n", "4", "--budget", "20"],
        "picky.pt failed on a batch of"),
    "NaN outputs beyond the checked images": (
        ["scan", "{root}/nan_bright.pt", "--data", "{root}/dark_then_bright.npz", "--attacks", "fgsm", "--eps", "0.1"],
        "returned NaN or infinite outputs on 4 of the 20 audited images"),
    "mean for more channels than the data": (["scan", "{root}/any_channels.pt", "--mean", "0.1,0.2,0.3"],
                                             "--mean has 3 values but data mnist has 1 channel(s)"),
    "std for more channels than the training data": (
        ["harden", "{root}/any_channels.pt", "--eps", "0.1", "--std", "0.1,0.2,0.3"],
        "--std has 3 values but data mnist has 1 channel(s)"),
    "empty data": (["scan", "{example}", "--data", ""], "data is empty"),
    "seed past 64 bits": (["scan", "{example}", "--seed", str(2**64)], "--seed must be between 0 and 2^63 - 1"),
    "negative seed": (["scan", "{example}", "--seed", "-1"], "--seed must be between 0 and 2^63 - 1"),
    "budget past int64": (["scan", "{example}", "--access", "hard-label", "--budget", str(10**20)],
                          "--budget must be between 1 and 2^62"),
    "harden seed past 64 bits": (["harden", "{example}", "--eps", "0.1", "--seed", str(2**64)],
                                 "--seed must be between 0 and 2^63 - 1"),
    "model without input gradients": (["scan", "{root}/inplace.pt", "-n", "10"],
                                      "inplace.pt failed computing input gradients on a batch of 10: "),
    "model without input gradients, hardened": (["harden", "{root}/inplace.pt", "--eps", "0.1"],
                                                "--access soft-label audits it without"),
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


def test_pickle_payload_never_runs(artefacts, example_onnx, capsys):
    code, _ = run(capsys, "scan", artefacts / "payload.pt", "--arch", "examples.mnist_cnn:build")
    assert code == 2
    assert not (artefacts / "PWNED").exists()
    for args in (["scan", artefacts / "payload.pt2"], ["scan", example_onnx, "--surrogate", artefacts / "payload.pt2"],
                 ["harden", artefacts / "payload.pt2", "--eps", "0.1", "--out", artefacts / "hardened"]):
        code, _ = run(capsys, *args)
        assert code == 2
    assert not (artefacts / "PWNED_PT2").exists()


@pytest.mark.parametrize("command", [["scan", "{example}"], ["harden", "{example}", "--eps", "0.1"],
                                     ["report", "{results}"]])
def test_an_empty_out_is_refused(command, example_onnx, capsys, tmp_path):
    """``--out ""`` would write the outputs into the working directory."""
    results = tmp_path / "results.json"
    args = [arg.format(example=example_onnx, results=results) for arg in command]
    code, err = run(capsys, *args, "--out", "")
    assert code == 2
    assert err == "error: Invalid value for '--out': the path is empty\n"


def test_the_api_refuses_an_empty_out_and_empty_data(example_onnx):
    from auditor import AuditError, harden, scan

    with pytest.raises(AuditError, match="^--out is empty"):
        scan(example_onnx, out="")
    with pytest.raises(AuditError, match="^data is empty"):
        scan(example_onnx, "")
    with pytest.raises(AuditError, match="^--out is empty"):
        harden(example_onnx, "mnist", eps=0.1, out="")


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


def test_check_with_an_unknown_policy_removes_the_junit_of_an_earlier_run(scanned, capsys, tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text("<testsuite tests='1' failures='0'/>")
    assert run(capsys, "check", scanned, "--policy", "no-such-policy", "--junit", junit)[0] == 2
    assert not junit.exists()


def test_check_that_fails_removes_the_junit_of_an_earlier_run(scanned, capsys, tmp_path):
    """CI publishes junit.xml even when the step fails: an old all-pass file must not survive."""
    junit = tmp_path / "junit.xml"
    assert run(capsys, "check", scanned, "--policy", "default", "--junit", junit)[0] in (0, 1)
    assert junit.exists()
    path = _edited(scanned, tmp_path, *BAD_RESULTS["attacks not a list"][:2])
    assert run(capsys, "check", path, "--policy", "default", "--junit", junit)[0] == 2
    assert not junit.exists() and not list(tmp_path.glob(".junit*"))


@pytest.mark.parametrize("name", ["RESULTS", "the policy file"])
def test_check_refuses_a_junit_path_that_is_one_of_its_inputs(name, scanned, capsys, tmp_path):
    """--junit is removed before the check runs: it must not be the file the check reads."""
    results, policy = tmp_path / "results.json", tmp_path / "gate.yaml"
    results.write_text(scanned.read_text())
    policy.write_text("name: gate\nrequire:\n  - clean_accuracy: 0.5\n")
    junit = results if name == "RESULTS" else policy
    before = junit.read_text()
    code, err = run(capsys, "check", results, "--policy", policy, "--junit", junit)
    assert code == 2
    assert err == f"error: --junit {junit} is {name}: give another path for the JUnit file\n"
    assert junit.read_text() == before


def test_check_refuses_a_junit_path_that_is_the_shipped_policy_it_names(scanned, capsys, tmp_path, monkeypatch):
    """--policy default names a shipped file: --junit must not delete it either
    (the shipped folder is redirected to a copy, in case the refusal fails)."""
    import auditor.policy
    import auditor.resources

    shipped = tmp_path / "policies"
    shipped.mkdir()
    (shipped / "default.yaml").write_text((auditor.resources.policies_dir() / "default.yaml").read_text())
    monkeypatch.setattr(auditor.resources, "policies_dir", lambda: shipped)
    monkeypatch.setattr(auditor.policy, "policies_dir", lambda: shipped)
    junit = shipped / "default.yaml"
    code, err = run(capsys, "check", scanned, "--policy", "default", "--junit", junit)
    assert code == 2
    assert err == f"error: --junit {junit} is the policy file: give another path for the JUnit file\n"
    assert junit.exists()


@pytest.mark.parametrize("bad", [["--target", "sideways"], ["--seed", "-1"], ["--budget", "0"], ["--mean", "0.1,0.2"]])
def test_a_scan_that_fails_removes_the_junit_of_an_earlier_run(bad, example_onnx, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "junit.xml").write_text("<testsuite tests='1' failures='0'/>")
    code, _ = run(capsys, "scan", example_onnx, *bad, "--out", out)
    assert code == 2
    assert not (out / "junit.xml").exists()


@pytest.mark.parametrize("command", [["check", "--policy", "strict"], ["report", "--out", "{tmp}/out"]])
def test_results_that_are_not_a_regular_file_are_refused(command, capsys, tmp_path):
    """A FIFO would block the read for ever: refused before opening it."""
    fifo = tmp_path / "results.json"
    os.mkfifo(fifo)
    code, err = run(capsys, command[0], fifo, *(arg.format(tmp=tmp_path) for arg in command[1:]))
    assert code == 2
    assert err == f"error: cannot read results.json: {fifo} is not a regular file\n"


def test_a_query_total_that_is_not_a_count_is_a_field_error(scanned, capsys, tmp_path):
    results = json.loads(scanned.read_text())
    results["attacks"][0]["queries"]["total"] = "many"
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    code, err = run(capsys, "check", path, "--policy", "strict")
    assert code == 2
    assert "attacks[0].queries.total must be an integer >= 0, got 'many'" in err and err.count("\n") == 1


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


def test_check_shows_control_characters_of_the_policy_as_escapes(scanned, capsys, tmp_path):
    """Names and ids from a policy file are printed: their escape sequences
    (here one setting the terminal's title) must not reach the terminal."""
    policy = tmp_path / "esc.yaml"
    policy.write_text('policy: "p\\e]0;pwned\\a"\n'
                      'requirements:\n  - id: "x\\e[2Jcleared"\n    no_checks_at: error\n')
    with pytest.raises(SystemExit):
        main(["check", str(scanned), "--policy", str(policy)])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "  x\\x1b[2Jcleared: no checks at level error or above" in out
    assert "policy p\\x1b]0;pwned\\x07: " in out


def test_error_lines_show_control_characters_as_escapes(capsys, tmp_path):
    policy = tmp_path / "p\x1b]0;pwned\x07\nq.yaml"
    policy.write_text("policy: p\n")
    code, err = run(capsys, "check", tmp_path / "results.json", "--policy", policy)
    assert code == 2
    shown = f"{tmp_path}/p\\x1b]0;pwned\\x07\\nq.yaml"
    assert err == f"error: policy {shown}: top level: missing required key 'requirements'\n"


def test_error_lines_show_bidirectional_overrides_as_escapes(capsys, tmp_path):
    """A right-to-left override in a file name would print it reversed."""
    policy = tmp_path / "x\u202elmay.exe"
    policy.write_text("policy: p\n")
    code, err = run(capsys, "check", tmp_path / "results.json", "--policy", policy)
    assert code == 2 and "\u202e" not in err
    assert err.startswith(f"error: policy {tmp_path}/x\\u202elmay.exe: ")


@pytest.mark.parametrize(
    ("text", "problem"),
    [('{"seed": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)"),
     ("[" * 100_000 + "]" * 100_000, "maximum recursion depth exceeded")],
    ids=["integer of 5000 digits", "nested 100000 deep"],
)
@pytest.mark.parametrize("command", [["check", "--policy", "strict"], ["report", "--out", "{tmp}/out"]])
def test_json_python_cannot_read_is_one_line_exit_2(command, text, problem, capsys, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(text)
    code, err = run(capsys, command[0], path, *(arg.format(tmp=tmp_path) for arg in command[1:]))
    assert code == 2
    assert err.startswith(f"error: results file {path}: cannot read JSON (") and err.count("\n") == 1, err
    assert problem in err
    assert not (tmp_path / "out").exists()


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


@pytest.mark.parametrize("folder", ["before", "after"])
def test_harden_refuses_an_out_whose_scan_folder_holds_other_files(folder, example_onnx, capsys, tmp_path):
    """A run replaces before/ and after/ whole: files auditor did not write
    there are refused before any work, not deleted."""
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "notes.txt").write_text("mine")
    code, err = run(capsys, "harden", example_onnx, "--eps", "0.1", "--out", tmp_path)
    assert code == 2
    assert err == (f"error: cannot write to {tmp_path / folder}: it holds notes.txt, which auditor did not write "
                   "(move it away or choose another --out)\n")
    assert (tmp_path / folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", [["check", "--policy", "strict"], ["report", "--out", "{tmp}/out"]])
def test_results_with_a_lone_surrogate_are_refused(command, scanned, capsys, tmp_path):
    """\\ud800 is valid JSON but no encoder can write it: the report crashed with an internal error."""
    path = tmp_path / "results.json"
    path.write_text(scanned.read_text().replace('"path": "', '"path": "\\ud800', 1))
    code, err = run(capsys, command[0], path, *(arg.format(tmp=tmp_path) for arg in command[1:]))
    assert code == 2
    assert err == f"error: results file {path}: holds text that is not valid Unicode (a lone surrogate)\n"
    assert not (tmp_path / "out").exists()
