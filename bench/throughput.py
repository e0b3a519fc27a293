"""Throughput of each access level's attack on the example model.

Prints one JSON line:

* per access level: images/s and queries/s of its attack on MNIST test
  images (white-box: PGD-40 L∞ on the torch copy of the example network;
  soft-label: Square L∞; hard-label: Sign-OPT L∞, both on the ONNX session),
  each timed on its second call (the first, on its own oracle, warms up);
* white-box overhead: PGD-k time ÷ the time of the passes PGD-k makes,
  done plainly on the same batch of correctly classified images: k
  forward+backward passes and one forward pass without gradients (the
  last iterate is only classified), at an ε so small that no sample stops
  early (the goal is under 1.1); ``ratio_per_pass`` divides by the passes
  PGD really made, in case some sample did stop.

Attacks run at ε=0.1 L∞ (ε=0.3 is broken within a handful of queries).
Sign-OPT is a minimum-norm attack: it spends its whole budget shrinking
the distortion, and a sample counts as a success when its final example,
verified on the session, is within ε in L∞.

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
from auditor.verify import eps_bound, verify

ROOT = Path(__file__).resolve().parent.parent
EPS = 0.1


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def level_figures(attack, new_oracle, x, y, eps, success=lambda result: result.success):
    """The attack's figures on its second call; the first, untimed, on an
    oracle of its own, warms it up without touching the query counts."""
    attack(new_oracle(), x, y, eps=eps, seed=0)
    oracle = new_oracle()
    result, seconds = timed(lambda: attack(oracle, x, y, eps=eps, seed=0))
    queries = int(oracle.queries().sum())
    return {
        "attack": attack.label,
        "images": len(y),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(y) / seconds, 2),
        "queries_per_s": round(queries / seconds, 1),
        "mean_queries": round(queries / len(y), 1),
        "success_rate": round(success(result).float().mean().item(), 3),
    }


def within_eps(model, x, y):
    """Success of a minimum-norm L∞ attack at ε: its final example fools
    ``model`` (verified) at an L∞ distortion within ε."""

    def success(result):
        checked = verify(model, x, result.x_adv, y, "linf")
        return checked.fooled & (checked.distortion <= eps_bound(EPS))

    return success


def pgd_overhead(module, x, y, steps: int) -> dict:
    attack = PGD(norm="linf", steps=steps)
    correct = module(x).argmax(1) == y
    x, y = x[correct], y[correct]
    oracle = GradientOracle(module, len(y))
    attack(oracle, x, y, eps=1e-6, seed=0)  # warm-up
    oracle = GradientOracle(module, len(y))
    _, pgd_seconds = timed(lambda: attack(oracle, x, y, eps=1e-6, seed=0))

    def raw_passes():  # as PGD: forward+backward at its first k iterates, forward only at the last
        for _ in range(steps):
            z = x.clone().requires_grad_(True)
            loss = F.cross_entropy(module(z), y)
            torch.autograd.grad(loss, z)
        with torch.no_grad():
            module(x)

    _, raw_seconds = timed(raw_passes)
    queries = int(oracle.queries().sum())
    raw_passes_made = (steps + 1) * len(y)  # per image k + 1 passes, counted as the oracle counts queries
    return {
        "steps": steps,
        "batch": len(y),
        "pgd_seconds": round(pgd_seconds, 4),
        "raw_seconds": round(raw_seconds, 4),
        "queries": queries,
        "ratio": round(pgd_seconds / raw_seconds, 3),
        "ratio_per_pass": round((pgd_seconds / queries) / (raw_seconds / raw_passes_made), 3),
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
        "white-box": level_figures(PGD(norm="linf"), lambda: GradientOracle(module, n), x, y, EPS),
        "soft-label": level_figures(SquareAttack(), lambda: ScoreOracle(probs, n, args.budget), x, y, EPS),
        "hard-label": level_figures(
            SignOPT(norm="linf"), lambda: LabelOracle(labels, n, args.budget), x, y, None,
            success=within_eps(onnx_model, x, y),
        ),
        "pgd_overhead": pgd_overhead(module, x, y, steps=40),
        "eps": EPS,
        "budget": args.budget,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps({"bench": "throughput", **figures}))


if __name__ == "__main__":
    main()
