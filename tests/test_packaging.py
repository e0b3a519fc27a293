"""templates/, policies/ and docs/ ship inside the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_templates_policies_and_docs(tmp_path):
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
