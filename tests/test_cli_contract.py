"""The command line's contract on standard output, and what its help and its lines say.

A reader of standard output that goes before the end (``| head``) leaves the
exit code the command's own; standard output that cannot be written (a full
disk) is one error line and exit code 2. Both need a real process and file
descriptors: they run ``python -m auditor``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from auditor.cli import main

PASSING = "policy: passing\nrequirements:\n  - clean_accuracy: {min: 0}\n"
FAILING = "policy: failing\nrequirements:\n  - robust_accuracy: {min: 1.0, eps: 0.5}\n"
"""Fails whatever the model: the scan below evaluates no ε of 0.5."""
SMALL_SCAN = ("-n", "4", "--access", "hard-label", "--attacks", "random-noise", "--budget", "10")


def _auditor(args, stdout) -> subprocess.CompletedProcess:
    """``python -m auditor ARGS`` with standard output on ``stdout``; stderr captured."""
    return subprocess.run([sys.executable, "-m", "auditor", *map(str, args)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=600, check=False)


def _with_closed_stdout(*args) -> subprocess.CompletedProcess:
    """Run auditor with standard output a pipe whose reader has gone, as in ``auditor ... | head -0``."""
    read, write = os.pipe()
    os.close(read)
    try:
        return _auditor(args, write)
    finally:
        os.close(write)


def _cli(capsys, *args) -> tuple[int, str]:
    """Exit code and standard output of ``auditor ARGS`` run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    return exit_info.value.code, capsys.readouterr().out


@pytest.fixture(scope="module")
def closed_scan(tmp_path_factory, example_onnx):
    """A scan with a policy it passes, its standard output closed: (process, out folder)."""
    root = tmp_path_factory.mktemp("closed")
    (root / "passing.yaml").write_text(PASSING)
    out = root / "scan"
    done = _with_closed_stdout("scan", example_onnx, *SMALL_SCAN, "--policy", root / "passing.yaml", "--out", out)
    return done, out


def test_a_closed_stdout_keeps_the_exit_code_of_a_passed_scan(closed_scan):
    """It was 1, the code of a failed policy, with nothing on stderr."""
    done, out = closed_scan
    assert (done.returncode, done.stderr) == (0, "")
    assert all((out / name).is_file() for name in ("results.json", "junit.xml", "report.pdf"))


def test_a_closed_stdout_keeps_the_exit_code_of_a_failed_check_and_its_junit(closed_scan, tmp_path):
    """The verdict lines go before junit.xml is written: the closed pipe must not cost the file."""
    (tmp_path / "failing.yaml").write_text(FAILING)
    junit = tmp_path / "junit.xml"
    done = _with_closed_stdout("check", closed_scan[1] / "results.json", "--policy", tmp_path / "failing.yaml",
                               "--junit", junit)
    assert (done.returncode, done.stderr) == (1, "")
    assert "<failure" in junit.read_text()


@pytest.mark.parametrize("args", [["attacks"], ["--help"]], ids=["attacks", "help"])
def test_a_closed_stdout_leaves_exit_code_0(args):
    done = _with_closed_stdout(*args)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_stdout_that_cannot_be_written_is_one_line_exit_2():
    """It was ``error: internal error: OSError ...``; a scan's would have named --out."""
    with open("/dev/full", "w") as full:
        done = _auditor(["attacks"], full)
    assert done.returncode == 2
    assert done.stderr == "error: cannot write to standard output: No space left on device\n"


def test_a_scan_names_every_file_it_wrote(example_onnx, capsys, tmp_path):
    """adversarials.npz and, with a policy, junit.xml were left out of the last line."""
    (tmp_path / "passing.yaml").write_text(PASSING)
    out = tmp_path / "scan"
    code, printed = _cli(capsys, "scan", example_onnx, *SMALL_SCAN, "--policy", tmp_path / "passing.yaml",
                         "--out", out)
    assert code == 0
    assert printed.splitlines()[-1] == (
        f"wrote {out / 'results.json'}, adversarials.npz, junit.xml, report.html and report.pdf"
    )


def test_attacks_help_is_plain_text(capsys):
    """The docstring's reStructuredText markup (````default````) was shown as is."""
    code, printed = _cli(capsys, "attacks", "--help")
    assert code == 0
    assert "``" not in printed and "own level, only when the scan's level is its own" in " ".join(printed.split())


def test_harden_help_says_what_epochs_are_for_free(capsys):
    """``--epochs`` read "Passes over the training data", which free training does not make."""
    code, printed = _cli(capsys, "harden", "--help")
    assert code == 0
    assert "free makes ⌈epochs/replays⌉ passes, each minibatch replayed --replays times" in " ".join(printed.split())
