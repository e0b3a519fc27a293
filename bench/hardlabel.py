"""The hard-label battery on the example model: distortion against queries, and speed.

Prints one JSON line. Each hard-label attack runs once, untargeted, on the
correctly classified images among a class-balanced subset of the MNIST
test split, with a budget of 4,000 label queries per sample, on the
onnxruntime session, given the test split as the images to start from where
no random direction finds the boundary (as a scan gives its data). For each
attack:

* ``median``: the median over the samples of the best distortion in the
  attack's own norm (L2 for the ``-l2`` rows) at 500, 1,000, 2,000 and
  4,000 queries (the last one at the budget), read from the per-sample
  traces and taken as results.json takes it (numpy's median: the mean of
  the two middle values); a sample with no adversarial example yet counts
  as infinitely far (``null`` in the median until more than half have one);
* for the L∞ rows, ``median_l2_at_budget``: the same median of the L2
  distortion of their final examples. Their traces hold L∞ distances only,
  so there is no L2 figure at the earlier query counts;
* ``success_rate`` (re-checked on the session) and ``seconds`` of wall time;
* ``queries_per_s`` and ``efficiency``: the session's own time for exactly
  the calls the attack made (same batch sizes) divided by the wall time.

The rows ending in ``-full`` draw their directions in full dimension, as the
papers do, rather than in the default low-frequency subspace; the
``-paper`` row also probes in every direction, not only in the tangent
space (HopSkipJump's ``tangent_probes``), so it is the paper's attack apart
from the initialisation.

    python bench/hardlabel.py [--samples 100] [--budget 4000]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import Recorded, example_images

from auditor.attacks.base import distortion
from auditor.attacks.hardlabel.shared import StartPool
from auditor.attacks.hardlabel.hop_skip_jump import HopSkipJump
from auditor.attacks.hardlabel.opt import OPT
from auditor.attacks.hardlabel.sign_opt import SignOPT
from auditor.battery import distortion_at
from auditor.data.builtin import mnist
from auditor.oracles import LabelOracle
from auditor.results import distortion_checkpoints

ATTACKS = {
    "sign-opt-l2": SignOPT(norm="l2"),
    "hop-skip-jump-l2": HopSkipJump(norm="l2"),
    "opt-l2": OPT(norm="l2"),
    "sign-opt-linf": SignOPT(norm="linf"),
    "hop-skip-jump-linf": HopSkipJump(norm="linf"),
    # the papers' full-dimensional directions, for comparison with the subspace default
    "sign-opt-l2-full": SignOPT(norm="l2", subspace=1),
    "hop-skip-jump-l2-full": HopSkipJump(norm="l2", subspace=1),
    # and the paper's HopSkipJump: full-dimensional probes in every direction
    "hop-skip-jump-l2-paper": HopSkipJump(norm="l2", subspace=1, tangent_probes=False),
}
CHECKPOINTS = (500, 1000, 2000, 4000)


def medians(points) -> dict[str, float | None]:
    """The median distortion at each (queries, per-sample distortions) point, as results.json has it."""
    curve = distortion_checkpoints(points)
    return {str(queries): None if m is None else round(m, 4) for queries, m in zip(curve["queries"], curve["median"])}


def run(attack, model, x, y, budget: int, starts: StartPool) -> dict:
    recorded = Recorded(model, lambda logits: logits.argmax(1))
    oracle = LabelOracle(recorded, len(y), budget)
    start = time.perf_counter()
    result = attack(oracle, x, y, seed=0, starts=starts)
    seconds = time.perf_counter() - start
    spent = oracle.queries()
    fooled = (model.forward(result.x_adv).argmax(1) != y) & result.success
    figures = {
        "median": medians(distortion_at(result.trace, spent, budget=budget, checkpoints=CHECKPOINTS)),
        "success_rate": round(float(fooled.double().mean()), 4),
        "seconds": round(seconds, 2),
        "queries_per_s": round(float(spent.sum()) / seconds),
        "efficiency": round(recorded.replay_seconds(tuple(x.shape[1:])) / seconds, 3),
    }
    if attack.norm != "l2":
        l2 = distortion(result.x_adv - x, "l2").double()
        l2[~fooled] = torch.inf
        figures["median_l2_at_budget"] = medians([(budget, l2.tolist())])[str(budget)]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--budget", type=int, default=4000)
    args = parser.parse_args()
    model, x, y = example_images(args.samples)
    data = mnist("test")
    starts = StartPool(data.x, data.y, torch.arange(len(data.y)))
    figures = {
        "model": "examples/mnist_cnn.onnx",
        "images": len(y),
        "budget": args.budget,
        "threads": torch.get_num_threads(),
    }
    for label, attack in ATTACKS.items():
        figures[label] = run(attack, model, x, y, args.budget, starts)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
