"""Surrogate models for transfer attacks: a small zoo, trained on the audit's training split.

A transfer attacker has no access to the target; it crafts its examples on
models of its own, trained on the same task (Papernot et al., "Practical
Black-Box Attacks against Machine Learning", AsiaCCS 2017, §4; Liu et al.,
"Delving into Transferable Adversarial Examples and Black-box Attacks",
ICLR 2017). Transfer is stronger from an ensemble of *different*
architectures (Liu et al. 2017 §4; Tramèr et al., "Ensemble Adversarial
Training", ICLR 2018), so the zoo holds three that differ from each other
and from the example target: a fully connected net, a small CNN with
max-pooling, and a ResNet-style net with batch normalisation and skip
connections (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016). Each trains in seconds on a few thousand MNIST-sized images on
two CPU cores. The convolutional ones keep their weights channels-last, which
on CPU about halves the cost of a gradient through their few-channel layers
(max-pooling above all); the function is the same.

Training is deterministic under a seed: parameters are initialised and the
data shuffled from a private ``torch.Generator``, never the global RNG, and
it runs on one intra-op thread, whose float sums add in one order whatever
the machine's thread count. Trained weights are cached by the data's hash,
the architecture, the seed, the epochs, :data:`VERSION` and the torch
version, as safetensors files written atomically, so a second scan on the
same data loads them instead of retraining (and never unpickles anything).
A file is used only if the cache key and the sha256 of its tensors written
beside them (:func:`weights_sha256`) match, and its tensors have the
architecture's dtypes and are finite; any other file is retrained over,
with a warning. The sha256 of every surrogate's weights goes into
results.json, the same whether they were trained or read from the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from torch.nn import functional as F

from .attacks.base import logit_margin
from .checks import is_randomised
from .data.base import Dataset
from .errors import AuditError, short_reason
from .oracles import logits_and_gradient

logger = logging.getLogger(__name__)

VERSION = "1"
"""Part of the cache key, with this module's own source: a change to the zoo
or the training recipe (the code, or constants such as :data:`LEARNING_RATE`)
retrains rather than reusing weights trained the old way."""

BATCH = 64
LEARNING_RATE = 1e-3
TRAINING_THREADS = 1
"""Intra-op threads the zoo trains on: a sum split among threads adds in an
order that depends on their count, so more than one would make the weights,
and every transfer result, depend on the machine's thread count."""
SANITY_SAMPLES = 64
"""Audit samples the randomness and gradient sanity checks of a surrogate run
on, the first ones, as the target's own checks do."""

Builder = Callable[[tuple[int, int, int], int], nn.Module]


def _mlp(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Two hidden layers of 256 ReLU units on the flattened image."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def _cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Two 3x3 convolutions (8 and 16 channels), each followed by 2x2 max-pooling, then two dense layers."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (height // 4) * (width // 4), 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    ).to(memory_format=torch.channels_last)


class _Residual(nn.Module):
    """A basic block of He et al. (2016), Fig. 2: x + F(x), F = conv-BN-ReLU-conv-BN."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def _resnet(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A strided stem, two residual stages (8 and 16 channels, each halving the resolution), global
    average pooling."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _Residual(8),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        _Residual(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    ).to(memory_format=torch.channels_last)


ZOO: dict[str, Builder] = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet}
"""name → builder(input_shape (C,H,W), num_classes) → an untrained module."""

ENSEMBLE = "ensemble"
"""The name of the surrogate set that averages the logits of all the surrogates."""


def _reserved(name: str) -> bool:
    """Whether ``name`` is :data:`ENSEMBLE` or a name :func:`train_surrogates` gives (``cnn-1``)."""
    return name == ENSEMBLE or re.fullmatch(f"({'|'.join(ZOO)})(-[0-9]+)?", name) is not None


def file_names(paths: Sequence[str | Path]) -> list[str]:
    """The names of the surrogate model files ``paths``, one each, all different.

    A file is named after its basename, with as many of its parent folders
    as it takes to tell it apart from the other files (``a/surrogate.pt``
    and ``b/surrogate.pt``), read from its absolute path. A name is never
    :data:`ENSEMBLE` or a trained surrogate's name (``mlp``, ``cnn-1``, ...):
    such a file takes its folder too (``models/mlp``). The same file given
    twice, under any path, is an :class:`~auditor.errors.AuditError`: the
    two would be one model counted twice in the ensemble.
    """
    first: dict[Path, str] = {}
    for path in paths:
        real = Path(path).resolve()
        if real in first:
            also = "" if first[real] == str(path) else f" (also as {first[real]})"
            raise AuditError(f"surrogate {path} is given twice{also}; give each surrogate once")
        first[real] = str(path)
    parts = [PurePath(os.path.abspath(path)).parts for path in paths]
    names = []
    for i, own in enumerate(parts):
        for k in range(1, len(own) + 1):
            suffix = own[-k:]
            if not _reserved(str(PurePath(*suffix))) and all(
                other[-k:] != suffix for j, other in enumerate(parts) if j != i
            ):
                break
        names.append(str(PurePath(*suffix)))
    return names


@dataclass(frozen=True)
class Surrogate:
    name: str
    module: nn.Module
    """In eval mode, on the CPU."""
    source: str
    """``"trained"`` for a zoo model, else the path it was loaded from."""
    sha256: str
    """Of its weights: a file's as the model loader computes it, a zoo model's
    :func:`weights_sha256` (the same trained or read from the cache)."""
    clean_accuracy: float | None = None
    """Accuracy on the evaluation data, ``None`` when none was given."""
    randomised: bool = False
    """Identical passes over the evaluation data gave different outputs (:func:`~auditor.checks.is_randomised`)."""
    zero_gradients: int = 0
    """Samples, of the ``checked`` first ones of the evaluation data, whose
    input gradient of the logit margin is all zero."""
    checked: int = 0
    """Samples the randomness and gradient checks ran on (0: not examined)."""


def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``module`` on ``(x, y)``, in chunks, without gradients."""
    with torch.no_grad():
        correct = sum(
            int((module(x[i : i + 1024]).argmax(1) == y[i : i + 1024]).sum()) for i in range(0, len(y), 1024)
        )
    return correct / max(len(y), 1)


def examine(surrogate: Surrogate, x: torch.Tensor, y: torch.Tensor) -> Surrogate:
    """``surrogate`` with what its checks need, measured on the audit samples
    ``(x, y)``: its clean accuracy on all of them and, on the first
    :data:`SANITY_SAMPLES`, whether identical passes differ (as the target's
    preflight asks) and how many
    samples have an all-zero input gradient of the logit margin (the
    target's gradient check, :func:`~auditor.checks.gradient_checks`).
    A surrogate whose gradient cannot be computed is an :class:`AuditError`:
    every transfer attack needs it."""
    module, batch, labels = surrogate.module, x[:SANITY_SAMPLES], y[:SANITY_SAMPLES]
    with torch.no_grad():
        randomised = is_randomised(module, batch, module(batch))
    try:
        _, grad = logits_and_gradient(module, batch, lambda logits: logit_margin(logits, labels))
    except Exception as exc:  # the loss is the auditor's own: the error is the surrogate's
        raise AuditError(f"surrogate {surrogate.name} failed computing input gradients: {short_reason(exc)} "
                         "(transfer attacks need them)") from exc
    return replace(
        surrogate, clean_accuracy=accuracy(module, x, y), randomised=randomised,
        zero_gradients=int((grad.flatten(1) == 0).all(dim=1).sum()), checked=len(labels),
    )


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op torch threads, the earlier count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_cache_dir() -> Path:
    """``$AUDITOR_CACHE/surrogates`` when set, else ``~/.cache/auditor/surrogates``."""
    root = os.environ.get("AUDITOR_CACHE")
    return Path(root) / "surrogates" if root else Path.home() / ".cache" / "auditor" / "surrogates"


def _initialise(module: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default initialisation of every convolution and linear layer, drawn from ``gen``.

    Weights and biases are uniform in ±1/√fan_in, the bound that
    ``reset_parameters`` gives both (Kaiming-uniform with a = √5); batch
    normalisation keeps its deterministic (1, 0).
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            bound = 1.0 / math.sqrt(layer.weight[0].numel())
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=gen)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=gen)


def _train(arch: str, train: Dataset, num_classes: int, seed: int, epochs: int) -> nn.Module:
    """Adam (lr 1e-3), batch 64, cross-entropy, ``epochs`` passes over a seeded
    shuffle, on :data:`TRAINING_THREADS` threads."""
    gen = torch.Generator().manual_seed(seed)
    module = ZOO[arch](tuple(train.x.shape[1:]), num_classes)
    _initialise(module, gen)
    optimiser = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)
    module.train()
    with intra_op_threads(TRAINING_THREADS):
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=gen)
            for start in range(0, len(order), BATCH):
                rows = order[start : start + BATCH]
                optimiser.zero_grad()
                F.cross_entropy(module(train.x[rows]), train.y[rows]).backward()
                optimiser.step()
    return module.eval()


def cache_key(
    data_sha256: str, input_shape: tuple, arch: str, num_classes: int, seed: int, epochs: int
) -> str:
    """sha256 over the data's hash, the input shape, the architecture, the classes, the seed, the
    epochs, :data:`VERSION`, the source of this module (the zoo and the recipe) and the torch
    version (whose kernels may round differently)."""
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    text = (f"{VERSION}|{recipe}|{torch.__version__}|{data_sha256}|{tuple(input_shape)}|{arch}|"
            f"{num_classes}|{seed}|{epochs}")
    return hashlib.sha256(text.encode()).hexdigest()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict, each tensor contiguous (channels-last weights as written to a file)."""
    return {name: tensor.detach().contiguous() for name, tensor in module.state_dict().items()}


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors of a state dict, in name order: each one's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save(module: nn.Module, path: Path, key: str) -> None:
    """Write the state dict as safetensors, with the cache key and its :func:`weights_sha256` in the
    metadata, to a temporary file in the same folder, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _state(module)
    metadata = {"auditor_surrogates": VERSION, "cache_key": key, "sha256": weights_sha256(state)}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(state, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class RejectedCache(ValueError):
    """A cached weights file that reads, but is not the one :func:`_save` wrote for this cache key."""


def _load(arch: str, shape: tuple, num_classes: int, path: Path, key: str) -> nn.Module:
    """The ``arch`` module cached at ``path`` for ``key``; :class:`RejectedCache` unless the file
    names that key, its tensors have the architecture's dtypes (float32, and int64 for batch
    normalisation's counter) and finite values, and their sha256 is the one written beside them."""
    with safe_open(str(path), framework="pt") as weights:
        metadata = weights.metadata() or {}
    state = load_file(path)
    if metadata.get("cache_key") != key:
        raise RejectedCache("written for another cache key")
    module = ZOO[arch](shape, num_classes)
    expected = module.state_dict()
    for name, tensor in state.items():
        if name in expected and tensor.dtype != expected[name].dtype:
            raise RejectedCache(f"{name} is {tensor.dtype}, not {expected[name].dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RejectedCache(f"{name} holds NaN or infinite values")
    if weights_sha256(state) != metadata.get("sha256"):
        raise RejectedCache("its tensors do not match the sha256 written with them")
    module.load_state_dict(state)
    return module.eval()


def train_surrogates(
    train: Dataset,
    k: int,
    *,
    num_classes: int,
    seed: int,
    cache_dir: Path | None = None,
    epochs: int = 3,
    evaluate: Dataset | None = None,
) -> list[Surrogate]:
    """Train (or load from the cache) ``k`` surrogates on ``train``.

    Surrogate i has the architecture ``list(ZOO)[i % len(ZOO)]`` and the seed
    ``seed + i``, so ``k > 3`` cycles through the zoo with fresh seeds; it is
    named after its architecture (``mlp``, ``cnn``, ``resnet``), with the
    cycle appended from the second cycle on (``mlp-1``, ...). A cached file
    that cannot be read, or fails a check of :func:`_load`, is retrained
    and rewritten, with a warning. With ``evaluate``, each surrogate is
    examined on it (:func:`examine`).
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
    archs, digest, shape = list(ZOO), train.sha256, tuple(train.x.shape[1:])
    surrogates = []
    for i in range(k):
        arch, cycle = archs[i % len(archs)], i // len(archs)
        name = arch if cycle == 0 else f"{arch}-{cycle}"
        key = cache_key(digest, shape, arch, num_classes, seed + i, epochs)
        path = folder / f"{arch}-{key[:32]}.safetensors"
        module = None
        if path.is_file():
            try:
                module = _load(arch, shape, num_classes, path, key)
                logger.info("surrogate %s: loaded from %s", name, path)
            except (OSError, RuntimeError, SafetensorError, RejectedCache) as exc:
                logger.warning("surrogate %s: cached weights %s rejected (%s); retraining", name, path,
                               short_reason(exc))
        if module is None:
            module = _train(arch, train, num_classes, seed + i, epochs)
            try:
                _save(module, path, key)
                logger.info(
                    "surrogate %s: trained %d epochs on %d images, cached at %s", name, epochs, len(train), path
                )
            except OSError as exc:  # a read-only cache (common in CI) costs a retrain next time, not the scan
                logger.warning("surrogate %s: trained, but not cached (%s)", name, short_reason(exc))
        surrogate = Surrogate(name=name, module=module, source="trained", sha256=weights_sha256(_state(module)))
        surrogates.append(surrogate if evaluate is None else examine(surrogate, evaluate.x, evaluate.y))
    return surrogates
