"""The query benchmarks run end to end on tiny settings and print one JSON line.

Their figures go into the issue notes; these runs only prove that the
scripts still work with the library as it is (a signature change once broke
bench/hardlabel.py silently). Timings are not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 60


def run_bench(name: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--samples", "10", "--budget", str(BUDGET)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_hardlabel_bench_reports_every_attack_at_the_budget():
    figures = run_bench("hardlabel")
    attacks = {key: value for key, value in figures.items() if isinstance(value, dict)}
    assert {"sign-opt-l2", "hop-skip-jump-l2", "opt-l2", "hop-skip-jump-l2-paper"} <= set(attacks)
    for row in attacks.values():
        assert list(row["median"])[-1] == str(BUDGET)
        assert 0.0 <= row["success_rate"] <= 1.0 and row["seconds"] > 0


@pytest.mark.parametrize(("name", "attacks"), [
    ("softlabel", {"square-linf", "square-l2", "nes-linf", "nes-l2", "genattack-linf"}),
    ("throughput", {"white-box", "soft-label", "hard-label"}),
])
def test_query_benches_report_success_and_speed(name, attacks):
    figures = run_bench(name)
    assert figures["budget"] == BUDGET
    for attack in attacks:
        assert 0.0 <= figures[attack]["success_rate"] <= 1.0
        assert figures[attack]["queries_per_s"] > 0
