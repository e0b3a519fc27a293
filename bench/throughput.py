"""Throughput of each access level's attack on the example model.

Prints one JSON line:

* per access level: images/s and queries/s of its attack on MNIST test
  images (white-box: PGD-40 L∞ on the torch copy of the example network;
  soft-label: Square L∞; hard-label: Sign-OPT L2, both on the ONNX session);
* white-box overhead: PGD-k time ÷ the time of (k+1) plain forward+backward
  passes on the same batch of correctly classified images, at an ε so small
  that no sample stops early (the goal is under 1.1); ``ratio_per_pass``
  divides by the passes PGD really made, in case some sample did stop.

Attacks run at ε=0.1 L∞ (ε=0.3 is broken within a handful of queries).

    python bench/throughput.py [--samples 200] [--budget 1000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from auditor.attacks.hardlabel.sign_opt import SignOPT
from auditor.attacks.softlabel.square import SquareAttack
from auditor.attacks.whitebox.pgd import PGD
from auditor.data.builtin import mnist
from auditor.models import load_model
from auditor.oracles import GradientOracle, LabelOracle, ScoreOracle

ROOT = Path(__file__).resolve().parent.parent
EPS = 0.1


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def level_figures(attack, oracle, x, y, eps):
    result, seconds = timed(lambda: attack(oracle, x, y, eps=eps, seed=0))
    queries = int(oracle.queries().sum())
    return {
        "attack": attack.label,
        "images": len(y),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(y) / seconds, 2),
        "queries_per_s": round(queries / seconds, 1),
        "mean_queries": round(queries / len(y), 1),
        "success_rate": round(result.success.float().mean().item(), 3),
    }


def pgd_overhead(module, x, y, steps: int) -> dict:
    attack = PGD(norm="linf", steps=steps)
    correct = module(x).argmax(1) == y
    x, y = x[correct], y[correct]
    oracle = GradientOracle(module, len(y))
    attack(oracle, x, y, eps=1e-6, seed=0)  # warm-up
    oracle = GradientOracle(module, len(y))
    _, pgd_seconds = timed(lambda: attack(oracle, x, y, eps=1e-6, seed=0))

    def raw_passes():
        for _ in range(steps + 1):
            z = x.clone().requires_grad_(True)
            loss = F.cross_entropy(module(z), y)
            torch.autograd.grad(loss, z)

    _, raw_seconds = timed(raw_passes)
    return {
        "steps": steps,
        "batch": len(y),
        "pgd_seconds": round(pgd_seconds, 4),
        "raw_seconds": round(raw_seconds, 4),
        "queries": int(oracle.queries().sum()),
        "ratio": round(pgd_seconds / raw_seconds, 3),
        "ratio_per_pass": round(
            (pgd_seconds / int(oracle.queries().sum())) / (raw_seconds / ((steps + 1) * len(y))), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--budget", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = mnist("test")
    x, y = data.x[: args.samples], data.y[: args.samples]
    onnx_model = load_model(ROOT / "examples" / "mnist_cnn.onnx")
    torch_model = load_model(ROOT / "examples" / "mnist_cnn.safetensors", arch="examples.mnist_cnn:build", device="cpu")
    module = torch_model.torch_module()
    n = len(y)
    probs = lambda z: torch.softmax(onnx_model.forward(z), 1)
    labels = lambda z: onnx_model.forward(z).argmax(1)
    figures = {
        "white-box": level_figures(PGD(norm="linf"), GradientOracle(module, n), x, y, EPS),
        "soft-label": level_figures(SquareAttack(), ScoreOracle(probs, n, args.budget), x, y, EPS),
        "hard-label": level_figures(SignOPT(), LabelOracle(labels, n, args.budget), x, y, None),
        "pgd_overhead": pgd_overhead(module, x, y, steps=40),
        "eps": EPS,
        "budget": args.budget,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps({"bench": "throughput", **figures}))


if __name__ == "__main__":
    main()
