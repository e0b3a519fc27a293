"""Train the example model on the built-in MNIST train split and export it.

Writes ``examples/mnist_cnn.onnx`` (today's default ``torch.onnx.export``)
and ``examples/mnist_cnn.safetensors`` (weights for ``--arch
examples.mnist_cnn:build``). Standard training, so the model is accurate
but not robust: the demo shows what an audit of such a model looks like.
Run it as a module from the repository's root (it imports ``examples.mnist_cnn``):

    python -m examples.train_mnist [--epochs 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from auditor.data.builtin import mnist
from examples.mnist_cnn import build

HERE = Path(__file__).resolve().parent
log = logging.getLogger("train_mnist")


def train(epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    train_set, test_set = mnist("train"), mnist("test")
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order_gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=order_gen)
        for start in range(0, len(order), 100):
            batch = order[start : start + 100]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(train_set.x[batch]), train_set.y[batch])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(test_set.x).argmax(1) == test_set.y).float().mean().item()
        log.info("epoch %d: loss %.3f, test accuracy %.3f", epoch + 1, loss.item(), acc)
    return model


def export(model: nn.Module, stem: Path) -> None:
    example = torch.rand(2, 1, 28, 28)
    torch.onnx.export(
        model,
        (example,),
        str(stem.with_suffix(".onnx")),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stem.with_suffix(".safetensors")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "mnist_cnn")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export(train(args.epochs, args.seed), args.out)
    log.info("wrote %s.onnx and %s.safetensors", args.out, args.out)


if __name__ == "__main__":
    main()
