"""Hardening: fast adversarial training against PGD training, ONNX in and ONNX out.

Prints one JSON line. Both methods start from ``examples/mnist_cnn.onnx``
(the MNIST CNN of Wong et al. 2020, trained without attacks) and train on
the built-in MNIST train split at ε = 0.3 L∞ through ``auditor.harden``
with its defaults (so the guard is on), each with its own settings:

* ``fast``: FGSM with a random start (Wong, Rice, Kolter, ICLR 2020) at a
  training radius of 1.2·ε, with α = 1.5 × that radius = 1.8·ε (the
  paper: 1.25·ε at radius ε);
* ``pgd``: PGD-40 with α = 0.01 (Madry et al., ICLR 2018), the baseline.

For each run: ``seconds``, the training wall time (guard checks included;
the before/after scans of ``auditor.harden`` run on ``--scan-samples``
images and are not counted); ``clean_accuracy`` on the 1,000 test digits
and ``pgd_50_10``, robust accuracy against PGD with 50 steps of α = 0.01
and 10 restarts (Wong et al.'s evaluation), run on the written ONNX file's
converted module and verified on its onnxruntime session; the guard's
events. ``fast`` runs ``--seeds`` seeds; ``time_ratio`` is pgd seconds ÷
the median fast seconds, and ``gap_pp`` the median fast PGD-50-10 accuracy
minus pgd's, in percentage points. The README's figures are from
``--seeds 5``.

    python bench/harden.py [--seeds 1] [--threads 1] [--scan-samples 100] [--scan-budget 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from auditor import harden
from auditor.attacks.whitebox.pgd import PGD
from auditor.data.builtin import mnist
from auditor.models import load_model
from auditor.oracles import GradientOracle
from auditor.verify import verify

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "mnist_cnn.onnx"
EPS = 0.3
STEP = 0.01


def evaluate(path: Path) -> dict:
    """Clean and PGD-50-10 accuracy of the written model on the MNIST test split."""
    data = mnist("test")
    model = load_model(path, device="cpu")
    attack = PGD(norm="linf", steps=50, restarts=10, rel_step=STEP / EPS)
    result = attack(GradientOracle(model.torch_module(), len(data.y)), data.x, data.y, eps=EPS, seed=0)
    fooled = verify(model, data.x, result.x_adv, data.y, "linf").fooled
    clean = (model.forward(data.x).argmax(1) == data.y).double().mean().item()
    return {"clean_accuracy": round(clean, 4), "pgd_50_10": round(1 - fooled.double().mean().item(), 4)}


def run(method: str, seed: int, work: Path, args) -> dict:
    result = harden(MODEL, "mnist", eps=EPS, method=method, seed=seed, out=work / f"{method}-{seed}",
                    samples=args.scan_samples, budget=args.scan_budget, device="cpu")
    record = result.record
    return {
        "seed": seed,
        "seconds": record["training_seconds"],
        "epochs": record["epochs_run"],
        **evaluate(result.model_path),
        "guard_events": [event["message"] for event in record["guard"]["events"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the fast method (0, 1, ...)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable timings)")
    parser.add_argument("--scan-samples", type=int, default=100)
    parser.add_argument("--scan-budget", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        fast = [run("fast", seed, work, args) for seed in range(args.seeds)]
        pgd = run("pgd", 0, work, args)
    fast_seconds = statistics.median(row["seconds"] for row in fast)
    fast_robust = statistics.median(row["pgd_50_10"] for row in fast)
    print(json.dumps({
        "bench": "harden",
        "model": str(MODEL.relative_to(ROOT)),
        "eps": EPS,
        "norm": "linf",
        "fast": fast,
        "pgd": pgd,
        "time_ratio": round(pgd["seconds"] / fast_seconds, 2),
        "gap_pp": round((fast_robust - pgd["pgd_50_10"]) * 100, 2),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
