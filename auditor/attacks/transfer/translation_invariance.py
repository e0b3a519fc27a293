"""TI: the gradient smoothed by a Gaussian kernel.

Dong, Pang, Su and Zhu, "Evading Defenses to Transferable Adversarial
Examples by Translation-Invariant Attacks", CVPR 2019, §3.2: the gradient
of the loss summed over all translations of the image is approximated by
convolving the gradient with a kernel W, W ∗ ∇J(x), with the Gaussian
kernel of §3.3. The kernel is the authors' ``gkern``: k×k samples of a
Gaussian on [−3σ, 3σ], so σ = (k−1)/6 pixels, normalised to sum 1, applied
to each channel with zero padding. The paper uses k = 15 on 299×299
ImageNet images; k = 7 is the size of the later combined attacks (Lin et
al. 2020; Wang & He 2021), the default here: σ = 1 pixel, a smoothing that
keeps its meaning on 28×28 digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .transform import Step, Transform


def gaussian_kernel(size: int, device, dtype) -> torch.Tensor:
    """The k×k kernel: a Gaussian sampled at k points of [−3, 3] per axis, normalised to sum 1."""
    points = torch.linspace(-3.0, 3.0, size, device=device, dtype=dtype)
    line = torch.exp(-(points**2) / 2)
    kernel = torch.outer(line, line)
    return kernel / kernel.sum()


@dataclass(frozen=True)
class TranslationInvariance(Transform):
    tag = "ti"
    stage = 4
    paper = (
        "Dong et al., Evading Defenses to Transferable Adversarial Examples by Translation-Invariant "
        "Attacks, CVPR 2019"
    )

    kernel: int = 7
    """k, the side of the Gaussian kernel (odd)."""

    def __post_init__(self):
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError("translation invariance needs an odd kernel size >= 1")

    def gradient(self, grad: torch.Tensor, state: None, step: Step) -> tuple[torch.Tensor, None]:
        """W ∗ ∇J, per channel (§3.2, the convolved gradient)."""
        channels = grad.shape[1]
        weight = gaussian_kernel(self.kernel, grad.device, grad.dtype).expand(channels, 1, -1, -1)
        return F.conv2d(grad, weight, padding=self.kernel // 2, groups=channels), state
