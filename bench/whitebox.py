"""White-box battery: overhead over raw model compute, and robust accuracy per attack.

Prints one JSON line:

* ``overhead``: for PGD-k and APGD-CE (k steps), attack time ÷ the time of
  the passes the attack makes, done plainly on the same batch: k
  forward+backward passes and one forward pass without gradients (both
  attacks only classify their last iterate). The batch is the images the
  model classifies correctly among the first ``--samples`` MNIST test
  images (472 of the first 500), on the CPU, at an ε so small that no
  sample stops early; medians of 5 alternating repeats; the target is
  ≤ 1.10;
* ``robust_accuracy``: each white-box attack run alone on the first
  ``--samples`` test images (500, correct or not) of the example model at
  ε = 0.1, 0.2, 0.3 L∞ (every image at every ε, no cascade), plus the
  cascade's per-sample worst case.

The model is the example ONNX file's converted torch module, as a white-box
scan of ``examples/mnist_cnn.onnx`` uses it.

    python bench/whitebox.py [--samples 500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from auditor.access import Access
from auditor.attacks.whitebox.apgd import APGD
from auditor.attacks.whitebox.apgd_t import APGDTargeted
from auditor.attacks.whitebox.fgsm import FGSM
from auditor.attacks.whitebox.pgd import PGD
from auditor.battery import build_battery, run_battery
from auditor.data.builtin import mnist
from auditor.models import load_model
from auditor.oracles import GradientOracle
from auditor.verify import verify

ROOT = Path(__file__).resolve().parent.parent
EPS = (0.1, 0.2, 0.3)


def overhead(attack, module, x, y, steps: int, repeats: int = 5) -> dict:
    """Median attack time ÷ median raw time, measured alternately to share the noise."""

    def raw_passes():  # as the attack: forward+backward at its first k iterates, forward only at the last
        for _ in range(steps):
            z = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(module(z), y), z)
        with torch.no_grad():
            module(x)

    attack(GradientOracle(module, len(y)), x, y, eps=1e-6, seed=0)  # warm-up
    attack_times, raw_times = [], []
    for _ in range(repeats):
        oracle = GradientOracle(module, len(y))
        start = time.perf_counter()
        attack(oracle, x, y, eps=1e-6, seed=0)
        attack_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        raw_passes()
        raw_times.append(time.perf_counter() - start)
    attack_seconds, raw_seconds = statistics.median(attack_times), statistics.median(raw_times)
    return {
        "attack": attack.label,
        "steps": steps,
        "batch": len(y),
        "attack_seconds": round(attack_seconds, 3),
        "raw_seconds": round(raw_seconds, 3),
        "passes": int(oracle.queries().sum()),
        "ratio": round(attack_seconds / raw_seconds, 3),
    }


def robust_accuracy(attack, model, x, y) -> dict:
    module = model.torch_module()
    accuracies, seconds = {}, 0.0
    for eps in EPS:
        start = time.perf_counter()
        result = attack(GradientOracle(module, len(y)), x, y, eps=eps, seed=0)
        seconds += time.perf_counter() - start
        fooled = verify(model, x, result.x_adv, y, "linf").fooled
        accuracies[f"{eps:g}"] = round(1 - fooled.double().mean().item(), 4)
    return {"robust_accuracy": accuracies, "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = mnist("test")
    x, y = data.x[: args.samples], data.y[: args.samples]
    model = load_model(ROOT / "examples" / "mnist_cnn.onnx", device="cpu")
    module = model.torch_module()
    correct = model.forward(x).argmax(1) == y
    xc, yc = x[correct], y[correct]
    figures = {
        "overhead": [
            overhead(PGD(norm="linf", steps=40), module, xc, yc, 40),
            overhead(APGD(norm="linf", loss="ce", steps=100), module, xc, yc, 100),
        ],
        "clean_accuracy": round(correct.double().mean().item(), 4),
        "attacks": {
            attack.label: robust_accuracy(attack, model, x, y)
            for attack in (FGSM(), PGD(steps=40), APGD(loss="ce"), APGD(loss="dlr"), APGDTargeted())
        },
    }
    battery = build_battery(Access.WHITE_BOX, "linf", ["apgd-ce-linf", "apgd-t-linf"])
    start = time.perf_counter()
    outcome = run_battery(battery, model, x, y, eps_list=EPS, budget=None, seed=0)
    figures["cascade"] = {
        "attacks": [attack.label for attack in battery.attacks],
        "robust_accuracy": {f"{e:g}": round(v, 4) for e, v in outcome.records.robust_accuracy(EPS).items()},
        "seconds": round(time.perf_counter() - start, 2),
    }
    figures["torch_threads"] = torch.get_num_threads()
    print(json.dumps({"bench": "whitebox", "samples": args.samples, **figures}))


if __name__ == "__main__":
    main()
