"""The white-box battery against AutoAttack (standard version) on the same samples.

Prints one JSON line: robust accuracy and wall time of ``auditor.scan`` at
white-box access, and of AutoAttack's ``run_standard_evaluation`` (APGD-CE,
APGD-T, FAB-T, Square with 5,000 queries) on the converted torch module, both
re-checked on the model's own runtime, plus the samples only one of them
broke. AutoAttack is not a dependency: install the reference code with
``pip install pyautoattack`` (fra31/auto-attack, packaged) to run this.

    python bench/vs_autoattack.py [MODEL] [--eps 0.1] [--samples 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import auditor
from auditor.data import load_data
from auditor.models import load_model

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(ROOT / "examples" / "mnist_cnn.onnx"))
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        from pyautoattack.autoattack import AutoAttack
    except ImportError:
        print(json.dumps({"skipped": "AutoAttack not installed: pip install pyautoattack"}))
        return

    start = time.perf_counter()
    audit = auditor.scan(args.model, args.data, access="white-box", samples=args.samples, norm=args.norm,
                         eps=[args.eps], seed=args.seed)
    ours_seconds = time.perf_counter() - start
    ours_robust = torch.tensor([
        sample["distortion"] is None or sample["distortion"] > args.eps + 1e-6
        for sample in audit.results["samples"]
    ])

    data = load_data(args.data)
    index = data.balanced_indices(args.samples)
    x, y = data.x[index], data.y[index]
    model = load_model(args.model)
    reference = AutoAttack(model.torch_module().eval(), norm={"linf": "Linf", "l2": "L2"}[args.norm],
                           eps=args.eps, version="standard", seed=args.seed)
    start = time.perf_counter()
    out = reference.run_standard_evaluation(x, y, batch_size=len(y))
    reference_seconds = time.perf_counter() - start
    x_adv = out[0] if isinstance(out, tuple) else out
    reference_robust = model.forward(x_adv).argmax(1) == y

    print(json.dumps({
        "model": args.model,
        "samples": len(y),
        "norm": args.norm,
        "eps": args.eps,
        "threads": torch.get_num_threads(),
        "ours": {"robust_accuracy": round(ours_robust.double().mean().item(), 4), "seconds": round(ours_seconds, 1),
                 "attacks": {a["name"]: round(a["seconds"], 2) for a in audit.results["attacks"]}},
        "autoattack": {"robust_accuracy": round(reference_robust.double().mean().item(), 4),
                       "seconds": round(reference_seconds, 1)},
        "broken_only_by_ours": (ours_robust.logical_not() & reference_robust).nonzero().flatten().tolist(),
        "broken_only_by_autoattack": (reference_robust.logical_not() & ours_robust).nonzero().flatten().tolist(),
    }))


if __name__ == "__main__":
    main()
