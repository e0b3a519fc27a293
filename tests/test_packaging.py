"""What ships inside the wheel (templates/, policies/, docs/, the example model,
the licence), and how the install of onnxruntime is recorded and checked."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import onnxruntime
import pytest

from auditor.models import onnxrt
from auditor.resources import example_model
from auditor.results import manifest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_templates_policies_docs_and_the_example_model(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(tmp_path)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("auditor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "auditor/templates/report.html.j2" in names
    assert "auditor/templates/report.css" in names
    assert {"auditor/policies/default.yaml", "auditor/policies/strict.yaml"} <= names
    assert "auditor/docs/checks.md" in names  # the report quotes each raised check's explanation
    assert "auditor/attacks/hardlabel/sign_opt.py" in names
    assert "auditor/examples/mnist_cnn.onnx" in names  # auditor demo's model
    examples = {name for name in names if name.startswith("auditor/examples/")}
    assert not {name for name in examples if not name.endswith((".py", ".onnx"))}  # no CI yml, no weights
    assert "auditor-0.1.0.dist-info/licenses/LICENSE" in names


def test_example_model_resolves_through_the_package():
    model = example_model()
    assert model.parts[-2:] == ("examples", "mnist_cnn.onnx")
    assert model.read_bytes() == (ROOT / "examples" / "mnist_cnn.onnx").read_bytes()


def test_demo_audits_the_packaged_model_from_any_directory(tmp_path, monkeypatch, capsys):
    """Run from a folder with no examples/ in it, the demo finds the model in the package."""
    from auditor.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "-n", "10", "--out", str(tmp_path / "demo")])
    assert exit_info.value.code == 0
    written = f"wrote {tmp_path / 'demo' / 'results.json'}, adversarials.npz, junit.xml, report.html and report.pdf"
    assert written in capsys.readouterr().out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["model"]["path"] == str(example_model())
    assert (tmp_path / "demo" / "report.pdf").stat().st_size > 0


def test_manifest_records_the_onnxruntime_loaded():
    record = manifest("auditor demo", "cpu")
    assert record["onnxruntime"] == onnxruntime.__version__
    assert record["onnxruntime_distributions"].startswith(("onnxruntime ", "onnxruntime-gpu "))
    assert record["onnxruntime_providers"].split(", ") == onnxruntime.get_available_providers()


@pytest.fixture
def gpu_install_warning():
    """The warning about onnxruntime's install, which is logged once a process, made fresh."""
    onnxrt._warn_about_gpu_install.cache_clear()
    yield
    onnxrt._warn_about_gpu_install.cache_clear()


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == onnxrt.__name__]


def test_both_onnxruntime_distributions_warn_once(gpu_install_warning, monkeypatch, caplog):
    monkeypatch.setattr(onnxrt.metadata, "distributions", lambda name: [name])
    with caplog.at_level(logging.WARNING, logger=onnxrt.__name__):
        onnxrt._providers("auto")
        onnxrt._providers("auto")
    (message,) = _warnings(caplog)
    assert "onnxruntime and onnxruntime-gpu are both installed" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in message


def test_a_gpu_without_the_cuda_provider_warns(gpu_install_warning, monkeypatch, caplog):
    monkeypatch.setattr(onnxrt.metadata, "distributions", lambda name: [name] if name == "onnxruntime" else [])
    monkeypatch.setattr(onnxrt.onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(onnxrt.torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger=onnxrt.__name__):
        onnxrt._providers("cpu")
        assert not _warnings(caplog)  # the CPU was asked for: nothing to say
        assert onnxrt._providers("auto") == ["CPUExecutionProvider"]
    (message,) = _warnings(caplog)
    assert message.startswith("torch sees a CUDA GPU but onnxruntime offers no CUDAExecutionProvider")
