"""The data contract: a labelled image set in [0,1] pixel space."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


CHANNEL_COUNTS = (1, 3, 4)
"""The sizes a channel axis may have (grey, RGB, RGBA): of an (N,C,H,W) or
(N,H,W,C) array, or of a model's input, the axis that has one of them is the
channel axis."""


@dataclass(frozen=True)
class Dataset:
    name: str
    """``mnist`` for the built-in set, else the path as given."""
    x: torch.Tensor
    """(N,C,H,W) float32 in [0,1], on the CPU."""
    y: torch.Tensor
    """(N,) int64 labels."""
    classes: tuple[str, ...] | None = None
    """Class names by label, where the data names them (an image folder's
    subfolders)."""

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def sha256(self) -> str:
        """Hash of the images and labels exactly as evaluated."""
        digest = hashlib.sha256()
        digest.update(self.x.contiguous().numpy().tobytes())
        digest.update(self.y.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def balanced_indices(self, n: int | None) -> torch.Tensor:
        """A deterministic, class-balanced choice of ``n`` indices.

        Classes are visited round-robin in ascending order and each
        contributes its samples in index order, so the first ``n`` picked are
        as balanced as the data allows. ``None`` or ``n >= len`` keeps all.
        """
        if n is None or n >= len(self):
            return torch.arange(len(self))
        if n <= 0:
            raise ValueError("n must be positive")
        # rank of each sample inside its own class (0 for its first member, ...)
        rank = torch.empty(len(self), dtype=torch.long)
        for c in torch.unique(self.y):
            members = torch.nonzero(self.y == c).flatten()
            rank[members] = torch.arange(len(members))
        order = torch.from_numpy(np.lexsort((self.y.numpy(), rank.numpy())))
        return torch.sort(order[:n]).values
