"""Transfer attacks: success on the example model from surrogates it never saw.

Prints one JSON line. Three surrogates are trained (or loaded from the
cache) on the built-in MNIST training split, one per zoo architecture;
every method of the default transfer set runs at ε = 0.3 L∞ on 200
class-balanced test digits that the target (``examples/mnist_cnn.onnx``,
verified on its onnxruntime session) classifies correctly, from each
surrogate alone and from their logit ensemble:

* ``surrogates``: name and clean accuracy on the whole test split, and
  ``surrogate_seconds``: the time to train (or load from the cache) all three;
* ``success_rate``: per method label, per surrogate set, the fraction of
  the 200 images the target misclassifies (one target query per image);
* ``seconds``: per method label, per surrogate set, the attack's wall time;
* ``best``: the method with the highest success averaged over the surrogate
  sets, and its margin over plain I-FGSM on each set (at ε = 0.3 the
  ensemble already breaks every image with I-FGSM, so the single, weaker
  surrogates tell the methods apart);
* ``seconds_total``: the whole run.

    python bench/transfer.py [--samples 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from auditor.attacks.transfer import METHODS
from auditor.data import load_data
from auditor.data.base import Dataset
from auditor.models import load_model
from auditor.oracles import SurrogateOracle
from auditor.surrogates import train_surrogates
from auditor.verify import verify

ROOT = Path(__file__).resolve().parent.parent
EPS = 0.3


def balanced_correct(model, test: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` class-balanced test images the target classifies correctly."""
    correct = (model.forward(test.x).argmax(1) == test.y).nonzero().flatten()
    pool = Dataset(name="correct", x=test.x[correct], y=test.y[correct])
    rows = pool.balanced_indices(n)
    return pool.x[rows], pool.y[rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    model = load_model(ROOT / "examples" / "mnist_cnn.onnx", device="cpu")
    train, test = load_data("mnist", split="train"), load_data("mnist", split="test")
    start = time.perf_counter()
    surrogates = train_surrogates(train, 3, num_classes=10, seed=0, evaluate=test)
    train_seconds = time.perf_counter() - start
    x, y = balanced_correct(model, test, args.samples)
    sets = {s.name: [s.module] for s in surrogates} | {"ensemble": [s.module for s in surrogates]}
    success: dict[str, dict[str, float]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for attack in METHODS:
        success[attack.label], seconds[attack.label] = {}, {}
        for name, modules in sets.items():
            start = time.perf_counter()
            result = attack(SurrogateOracle(modules), x, y, eps=EPS, seed=0)
            seconds[attack.label][name] = round(time.perf_counter() - start, 2)
            fooled = verify(model, x, result.x_adv, y, "linf").fooled
            success[attack.label][name] = round(fooled.double().mean().item(), 4)
    baseline = success[METHODS[0].label]
    best = max(success, key=lambda label: sum(success[label].values()))
    print(
        json.dumps(
            {
                "bench": "transfer",
                "samples": len(y),
                "eps": EPS,
                "norm": "linf",
                "surrogates": [
                    {"name": s.name, "clean_accuracy": round(s.clean_accuracy, 4)} for s in surrogates
                ],
                "surrogate_seconds": round(train_seconds, 2),
                "success_rate": success,
                "seconds": seconds,
                "best": {
                    "attack": best,
                    "over_ifgsm": {name: round(success[best][name] - baseline[name], 4) for name in sets},
                },
                "seconds_total": round(time.perf_counter() - begin, 2),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
