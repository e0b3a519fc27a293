"""The iterative core of every transfer attack: I-FGSM with the transforms' hooks.

Kurakin, Goodfellow and Bengio, "Adversarial Examples in the Physical
World", ICLR Workshop 2017 (the basic iterative method), as written by
Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018,
Eq. 3, with their step size α = ε/T so that T steps can reach the boundary
(§2.1):

* x_0 = x;
* at step t, the gradient is taken at the look-ahead point (x_t unless a
  look-ahead hook moves it), averaged over the input transforms' copies
  and taken through them by the chain rule;
* the gradient transforms turn it into the direction g;
* x_{t+1} = Clip_{x,ε}(x_t + α·sign(g)) for L∞ (Eq. 3); for L2 the step is
  α·g/‖g‖₂ followed by the projection onto the ε-ball, Dong et al.'s L2
  variant; the clip also keeps x_{t+1} in [0,1]. In L2, g's components
  that point out of [0,1] at a pixel already at 0 or 1 are dropped before
  normalising (a deviation: on images with many saturated pixels, such as
  MNIST, the clip otherwise ate most of each step, and T steps stopped well
  inside the ball).

The attack objective is maximised; the whole batch moves at once, and no
sample stops early: the target is never queried here, and more steps on
the surrogates do not hurt a transfer example the way they would a
white-box one (Dong et al. 2018 use all T steps too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...oracles import SurrogateOracle
from ..base import project
from .transform import Step, Transform

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits (M,K), labels (M,)) → per-sample objective (M,) to maximise."""


def ifgsm(
    oracle: SurrogateOracle,
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    transforms: Sequence[Transform],
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    gen: torch.Generator,
) -> torch.Tensor:
    """Run ``steps`` iterations from ``x`` and return x_T.

    ``y`` are the true labels (the input transforms may use them, e.g.
    Admix's other classes); ``labels`` are the labels the objective is
    about (``y`` untargeted, the targets when targeted); ``transforms`` are
    in stage order.
    """
    n = len(x)
    if n == 0:
        return x.clone()

    def grad_at(point: torch.Tensor) -> torch.Tensor:
        """∇ of the objective averaged over the copies, through the input transforms."""
        point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            copies = point
            for transform in transforms:
                copies = transform.expand(copies, y.repeat(len(copies) // n), gen)
        k = len(copies) // n
        targets = labels.repeat(k)
        _, grad = oracle.loss_grad(copies, lambda logits: objective(logits, targets) / k)
        (grad,) = torch.autograd.grad(copies, point, grad)
        return grad

    low, high = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    states = [transform.start(x) for transform in transforms]
    x_adv = x.clone()
    for t in range(steps):
        step = Step(index=t, x=x_adv, eps=eps, alpha=alpha, norm=norm, gen=gen, grad_at=grad_at)
        point = x_adv
        for transform, state in zip(transforms, states):
            point = transform.lookahead(point, state, step)
        direction = grad_at(point)
        for i, transform in enumerate(transforms):
            direction, states[i] = transform.gradient(direction, states[i], step)
        if norm == "linf":
            x_adv = torch.clamp(x_adv + alpha * direction.sign(), low, high)
        else:
            # components that push a pixel already at 0 or 1 further out would be
            # clipped away after the step: left out before normalising, the step
            # keeps its length α (on MNIST, where most pixels sit at 0 or 1,
            # ten steps otherwise reached about 0.8ε)
            blocked = ((x_adv <= 0.0) & (direction < 0)) | ((x_adv >= 1.0) & (direction > 0))
            direction = direction.masked_fill(blocked, 0.0)
            size = direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x_adv = project(x_adv + alpha * direction / size, x, eps, norm)
    return x_adv
