"""The example MNIST CNN of Wong et al. (2020), "Fast is better than free".

Conv(1->16, k4, s2, p1) - ReLU - Conv(16->32, k4, s2, p1) - ReLU -
FC(1568->100) - ReLU - FC(100->10). Use it with a weights file as
``--arch examples.mnist_cnn:build``.
"""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
