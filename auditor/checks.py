"""Validity checks with stable ids (after AutoAttack's ``checks.py`` and
Carlini et al., "On Evaluating Adversarial Robustness", 2019).

Each check has an id that never changes, a level (info < warning < error)
and a paragraph in ``docs/checks.md`` under the same id. Policies cite the
level (``no_checks_at: warning``); the report quotes each raised id's paragraph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .access import Access
from .attacks import BY_LABEL
from .attacks.base import MIN_NORM, Attack, logit_margin
from .attacks.hardlabel.hop_skip_jump import HopSkipJump
from .attacks.whitebox.apgd import APGDConfig
from .attacks.whitebox.pgd import PGD
from .models.base import RANDOMNESS_PASSES, GradientFailed, Model, plural, seeded_rng
from .models.logits import are_probabilities
from .oracles import GradientOracle, LabelOracle, ScoreOracle, SurrogateOracle, logits_and_gradient
from .eps import eps_text
from .verify import BLACK_BOX_PASSES, VOTES, eps_bound, verify

if TYPE_CHECKING:
    from .battery import AttackReport, Battery, Records
    from .surrogates import Surrogate

LEVELS = ("info", "warning", "error")


@dataclass(frozen=True)
class Check:
    id: str
    level: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


RANDOMISED_MODEL = "randomised-model"
SOFTMAX_OUTPUTS = "softmax-outputs"
SOFTMAX_REMOVED = "softmax-removed"
LOW_CLEAN_ACCURACY = "low-clean-accuracy"
ATTACK_SKIPPED = "attack-skipped"
ACCESS_LIMITED = "access-limited"
ZERO_GRADIENTS = "zero-gradients"
NAN_GRADIENTS = "nan-gradients"
WEAKER_ATTACK_WINS = "weaker-attack-wins"
NON_MONOTONE = "non-monotone"
UNBOUNDED_ATTACK_FAILS = "unbounded-attack-fails"
NOISE_BEATS_ATTACKS = "noise-beats-attacks"
NO_ADVERSARIAL_FOUND = "no-adversarial-found"
CUSTOM_BATTERY = "custom-battery"
WEAK_SURROGATE = "weak-surrogate"
SURROGATE_ZERO_GRADIENTS = "surrogate-zero-gradients"
RANDOMISED_SURROGATE = "randomised-surrogate"
SMALL_BUDGET = "small-budget"
TRANSFER_ONLY = "transfer-only"
NO_GRADIENT_ATTACK = "no-gradient-attack"
NO_TARGET_IMAGE = "no-target-image"
TRAINING_DATA_AUDITED = "training-data-audited"
SATURATED_SCORES = "saturated-scores"
PIECEWISE_CONSTANT = "piecewise-constant"
QUANTISED_INPUT = "quantised-input"
IDS = (
    RANDOMISED_MODEL, SOFTMAX_OUTPUTS, SOFTMAX_REMOVED, LOW_CLEAN_ACCURACY, ATTACK_SKIPPED, ACCESS_LIMITED,
    ZERO_GRADIENTS, NAN_GRADIENTS, WEAKER_ATTACK_WINS, NON_MONOTONE, UNBOUNDED_ATTACK_FAILS,
    NOISE_BEATS_ATTACKS, NO_ADVERSARIAL_FOUND, CUSTOM_BATTERY, WEAK_SURROGATE, SURROGATE_ZERO_GRADIENTS,
    RANDOMISED_SURROGATE, SMALL_BUDGET, TRANSFER_ONLY, NO_GRADIENT_ATTACK, NO_TARGET_IMAGE, TRAINING_DATA_AUDITED,
    SATURATED_SCORES, PIECEWISE_CONSTANT, QUANTISED_INPUT,
)
"""Every check id, each documented in ``docs/checks.md``; policies may cite them (``no_checks``)."""

SMALL_BUDGET_ERROR_BELOW = 100
SMALL_BUDGET_WARNING_BELOW = 1000

LOW_CLEAN_ACCURACY_BELOW = 0.5

REPEAT_RTOL, REPEAT_ATOL = 1e-4, 1e-5
"""How far two identical forward passes may differ (float noise) before the model counts as randomised."""
RANDOMNESS_ROWS = 8
"""Images the preflight runs :data:`~auditor.models.base.RANDOMNESS_PASSES` times."""


def same_outputs(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether the outputs of two identical forward passes agree up to float noise."""
    return torch.allclose(first, second, rtol=REPEAT_RTOL, atol=REPEAT_ATOL, equal_nan=True)


@dataclass(frozen=True)
class Preflight:
    """What the preflight found; the scan raises the checks, describing the battery it adapts."""

    probabilities: bool
    """The outputs are probabilities (non-negative, each row summing to one)."""
    randomised: bool
    """Identical passes differed: every label of the scan is then the most
    frequent of :data:`~auditor.verify.VOTES` passes."""
    steps: Steps | None = None
    """What nudges of the inputs left unchanged, where they left at least
    :data:`STEPS_SHARE` of the outputs unchanged (:func:`input_steps`); None otherwise."""


NUDGE = 1e-3
"""The largest change per pixel of the preflight's first nudges: within a
cell of 256-level quantisation for images on that grid (as decoded from
8-bit files, and the built-in digits), and far beyond float32 or float16
round-off in the logits of a smooth network."""

COARSE_NUDGE = 1e-2
"""The change of the pixels the second nudges move: out of its cell of
8-bit quantisation (1/255) for every pixel, out of its cell of 16 grey
levels or fewer only for a pixel within 0.01 of a cell edge."""

STEPS_SHARE = 0.75
"""The share of judged images the small nudges must leave unchanged for a
verdict: a clear majority. At a half, 32 grey levels (29 to 37 of 64 digits
unchanged, by seed) got a verdict that depended on the seed; at three
quarters the line moves to about 20 to 26 grey levels, where it still does."""

COARSE_SHARE = 0.01
"""The share of pixels (at least one) the second nudges move: enough that
one crosses an 8-bit cell edge in every image, too few that one near a
coarse cell's edge is among them in most."""


@dataclass(frozen=True)
class Steps:
    """Outputs that nudges of the images (the first 64 audited) left bit-identical."""

    images: int
    """Images nudged."""
    pixels: int
    """Input values of an image."""
    judged: int
    """Images judged: all, but rows of probabilities with an exact 0."""
    unchanged: int
    """Of those, the images some nudge of at most :data:`NUDGE` left unchanged."""
    coarse: int
    """Of those, the images some nudge of :data:`COARSE_SHARE` of the pixels
    by :data:`COARSE_NUDGE` left unchanged too."""

    @property
    def moved(self) -> int:
        """Input values the second nudges move in each image."""
        return _moved(self.pixels)

    @property
    def is_coarse(self) -> bool:
        """Most of the images the small nudges left unchanged, the large ones did too."""
        return self.coarse * 2 > self.unchanged


def preflight(model: Model, x: torch.Tensor, seed: int) -> Preflight:
    """Detection that needs the model, run before the battery.

    The model counts as randomised if two passes over ``x`` differ, or any of
    :data:`~auditor.models.base.RANDOMNESS_PASSES` over its first
    :data:`RANDOMNESS_ROWS` images; a deterministic model has input steps
    if nudges of ``x`` (:func:`input_steps`) leave at least
    :data:`STEPS_SHARE` of its outputs unchanged. Their checks (:func:`randomised_model`, :func:`steps_check`)
    describe the battery adapted to them, so the caller raises them.
    """
    batch = x.to(model.device)
    first = model.forward(batch)
    probabilities = are_probabilities(first)
    if is_randomised(model.forward, batch, first):
        return Preflight(probabilities, True)
    steps = input_steps(model.forward, batch, first, seed, probabilities)
    found = steps.judged > 0 and steps.unchanged >= STEPS_SHARE * steps.judged
    return Preflight(probabilities, False, steps if found else None)


def _moved(pixels: int) -> int:
    """Input values the second nudges move in an image of ``pixels``: :data:`COARSE_SHARE`, at least one."""
    return max(1, round(COARSE_SHARE * pixels))


def _unchanged(forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, first: torch.Tensor,
               nudges: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image, whether one of ``nudges`` (clipped to [0,1]) left its outputs bit-identical."""
    same = torch.zeros(len(batch), dtype=torch.bool, device=first.device)
    for nudge in nudges:
        same |= (forward((batch + nudge.to(batch.device, batch.dtype)).clamp(0.0, 1.0)) == first).all(dim=1)
    return same


def input_steps(forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, first: torch.Tensor,
                seed: int, probabilities: bool) -> Steps:
    """Which outputs nudges of every pixel by at most :data:`NUDGE`, then of
    :data:`COARSE_SHARE` of the pixels by :data:`COARSE_NUDGE`, left
    bit-identical (:func:`_unchanged`; the noise is drawn from ``seed``). A
    smooth network's outputs all change; a model behind input quantisation or
    a threshold keeps them. Rows of probabilities with an exact 0 are not
    judged: a saturated softmax keeps its 0s and 1s under any small change."""
    generator = torch.Generator().manual_seed(seed)
    judged = (first > 0).all(dim=1) if probabilities else torch.ones(len(first), dtype=torch.bool,
                                                                        device=first.device)
    # every pixel by at most NUDGE: random signs, all up, all down (floor, truncation and a threshold at
    # a grid value keep their outputs through a one-sided nudge)
    size = torch.rand(batch.shape, generator=generator) * NUDGE
    signs = torch.randint(0, 2, batch.shape, generator=generator) * 2 - 1
    fine = _unchanged(forward, batch, first, (size * signs, size, -size)) & judged
    # a few pixels by COARSE_NUDGE each, away from the nearer end of [0,1] so that none is clipped back
    pixels = batch[0].numel()
    picked = torch.rand(len(batch), pixels, generator=generator).argsort(dim=1) < _moved(pixels)
    inward = torch.where(batch.cpu() < 0.5, 1.0, -1.0)
    coarse = _unchanged(forward, batch, first, (picked.view(batch.shape) * inward * COARSE_NUDGE,)) & fine
    return Steps(len(first), pixels, int(judged.sum()), int(fine.sum()), int(coarse.sum()))


def steps_check(steps: Steps, attacks: Sequence[Attack] = ()) -> Check:
    """``piecewise-constant`` (coarse steps, a warning) or ``quantised-input``
    (fine ones, information) for what :func:`input_steps` found, naming what
    the battery ``attacks`` (as adapted) do about it."""
    saturated = steps.images - steps.judged
    left_out = f" ({saturated} more were saturated probabilities, not judged)" if saturated else ""
    found = (f"nudges of at most {NUDGE:g} per pixel left the model's outputs bit-identical on "
             f"{steps.unchanged} of {steps.judged} images{left_out}")
    large = f"nudges of {steps.moved} of the {steps.pixels} input values by {COARSE_NUDGE:g}"
    coarse = any(isinstance(attack, HopSkipJump) for attack in attacks)
    probes = "; HopSkipJump probes and bisects on a coarser scale" if coarse else ""
    if steps.is_coarse:
        return Check(
            PIECEWISE_CONSTANT, "warning",
            f"{found}, and {large} left them so on {steps.coarse}: the model's output is piecewise "
            "constant in its input, in coarse steps (a few grey levels, a threshold). Its gradients are zero "
            f"and small query probes see no change{probes}; attacks may still miss examples such a model "
            "has, so robust accuracy may be overstated (an adaptive attack such as BPDA is not run)",
        )
    changed = f"all but {steps.coarse}" if steps.coarse else "all of them"
    return Check(
        QUANTISED_INPUT, "info",
        f"{found}, but {large} changed {changed}: the model quantises its input in fine steps (8-bit or so). "
        f"Its gradients are zero and the smallest query probes see no change{probes}",
    )


def is_randomised(forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
                  first: torch.Tensor) -> bool:
    """Whether identical passes of ``forward`` differ (``first``: its output
    on ``batch``, already computed): another pass over ``batch``, or any of
    :data:`~auditor.models.base.RANDOMNESS_PASSES` over its first
    :data:`RANDOMNESS_ROWS` images. The target model's preflight and the
    surrogates' examination both ask it."""
    if not same_outputs(first, forward(batch)):
        return True
    rows = batch[:RANDOMNESS_ROWS]
    reference = forward(rows)
    return any(not same_outputs(reference, forward(rows)) for _ in range(RANDOMNESS_PASSES - 1))


def randomised_model(model: Model, rows: torch.Tensor, seed: int, attacks: Sequence[Attack] = ()) -> Check:
    """``randomised-model``: how the battery ``attacks`` (as adapted to a
    randomised model) meet its randomness, and whether ``--seed`` fixes the
    model's draws: two passes from the same seed of torch's generator agree
    only if the model draws from it (a TorchScript dropout does; an ONNX
    RandomNormalLike or a numpy draw does not); ``rows``, the images passed."""
    def seeded_pass() -> torch.Tensor:
        with seeded_rng(seed, "randomised-model"):
            return model.forward(rows)

    eot = max((attack.eot for attack in attacks if isinstance(attack, APGDConfig)), default=1)
    single = [attack.label for attack in attacks
              if attack.oracle is GradientOracle and not (isinstance(attack, APGDConfig) and attack.eot > 1)]
    ways = [f"APGD averages each step over {eot} passes (EOT)"] if eot > 1 else []
    if single:
        ways.append(f"{', '.join(single)} {'queries' if len(single) == 1 else 'query'} single passes")
    if any(attack.oracle in (ScoreOracle, LabelOracle) for attack in attacks):
        ways.append("each answer to a score or label query is the most frequent label or the mean "
                    f"probabilities of {BLACK_BOX_PASSES} passes, and costs {BLACK_BOX_PASSES} queries")
    if any(attack.oracle is SurrogateOracle for attack in attacks):
        ways.append("transfer examples are crafted on the surrogates, and only the vote judges them")
    message = (
        "identical forward passes gave different outputs: the model is randomised. Each label of this "
        f"audit, clean or adversarial, is the one most of {VOTES} passes give"
        + "".join(f"; {way}" for way in ways)
        + ". Attacks on a model whose answers move with each draw find fewer examples than it has (black-box "
        "figures stood well above APGD with EOT on noisy test models), so robust accuracy may be overstated"
    )
    if not same_outputs(seeded_pass(), seeded_pass()):
        message += ("; its draws do not come from torch's generator, which --seed seeds, so the seed does not "
                    "control them (another run may give other results, unless the model seeds them itself)")
    return Check(RANDOMISED_MODEL, "warning", message)


def final_softmax(removed: bool) -> Check:
    """For a white-box audit of a model that outputs probabilities: whether
    its final softmax was removed for the attacks (``softmax-removed``) or
    masks their gradients (``softmax-outputs``). The other access levels
    attack what the model outputs, and need neither."""
    if removed:
        return Check(
            SOFTMAX_REMOVED, "info",
            "the model outputs probabilities: white-box attacks and gradient checks ran on the logits "
            "beneath its final softmax, as an attacker holding the weights would; "
            "every example was verified on the model itself",
        )
    return Check(
        SOFTMAX_OUTPUTS, "warning",
        "the model outputs probabilities, not logits, and its final softmax could not be removed: saturated "
        "softmax can mask gradients and weaken gradient-based attacks (audit the model without it)",
    )


def low_clean_accuracy(clean_accuracy: float) -> list[Check]:
    if clean_accuracy >= LOW_CLEAN_ACCURACY_BELOW:
        return []
    return [Check(
        LOW_CLEAN_ACCURACY, "warning",
        f"clean accuracy is {clean_accuracy:.1%}: check that the data matches the model "
        "(labels, channel order, --mean/--std)",
    )]


def small_budget(level: Access, budget: int, passes: int = 1) -> list[Check]:
    """At soft- or hard-label access the budget-bound attacks are the
    strongest that run, and too few answers show nothing about them
    (``passes``: queries an answer costs, :data:`~auditor.verify.BLACK_BOX_PASSES`
    on a randomised model)."""
    answers = budget // passes
    if level not in (Access.SOFT_LABEL, Access.HARD_LABEL) or answers >= SMALL_BUDGET_WARNING_BELOW:
        return []
    severity = "error" if answers < SMALL_BUDGET_ERROR_BELOW else "warning"
    below = SMALL_BUDGET_ERROR_BELOW if severity == "error" else SMALL_BUDGET_WARNING_BELOW
    given = f"--budget {budget:,} pays {answers:,} answers of {passes} passes, below {below:,}" if passes > 1 else (
        f"--budget {budget:,} is below {below:,} queries")
    return [Check(
        SMALL_BUDGET, severity,
        f"{given} per sample: at {level.cli_name} access the attacks barely start, so robust accuracy is overstated",
    )]


def saturated_scores(
    battery: "Battery", logits: torch.Tensor, probabilities: bool, y: torch.Tensor, correct: torch.Tensor
) -> list[Check]:
    """At soft-label access without a label-only attack in the battery:
    ``correct``ly classified samples whose probabilities, as the attacks
    receive them, are exactly 0 for every other class (below the smallest
    normal float32), so that the score attacks' log-margin loss is flat
    around them. ``logits`` are the model's clean outputs (its probabilities
    where ``probabilities``). HopSkipJump, in the default soft-label battery,
    reads the labels, which stay informative there."""
    reads_labels = any(attack.oracle is LabelOracle and not attack.baseline for attack in battery.attacks)
    if battery.level != Access.SOFT_LABEL or reads_labels or not correct.any():
        return []
    probs = (logits if probabilities else torch.softmax(logits, dim=1)).float()[correct]
    others = probs.scatter(1, y[correct][:, None], 0.0).amax(dim=1)
    flat = int((others < torch.finfo(torch.float32).tiny).sum())
    if not flat:
        return []
    return [Check(
        SATURATED_SCORES, "warning",
        f"{flat} of the {int(correct.sum())} correctly classified samples get probabilities of exactly 0 for "
        "every other class: the score attacks see a flat loss there and the battery has no label-only attack, "
        "so robust accuracy at soft-label access is overstated; a soft-label attacker also has the labels: "
        "add hop-skip-jump to --attacks or audit with --access hard-label",
    )]


def surrogate_checks(surrogates: Sequence["Surrogate"]) -> list[Check]:
    """Surrogates whose transfer attacks say less than they seem to: one that
    gets most audit samples wrong (``weak-surrogate``), one with all-zero
    input gradients on some of them (``surrogate-zero-gradients``), one whose
    outputs are random (``randomised-surrogate``)."""
    return [check for surrogate in surrogates for check in _checks_of_surrogate(surrogate)]


def _checks_of_surrogate(surrogate: "Surrogate") -> list[Check]:
    """The checks one examined surrogate raises (:func:`~auditor.surrogates.examine`)."""
    found = []
    if surrogate.clean_accuracy is not None and surrogate.clean_accuracy < LOW_CLEAN_ACCURACY_BELOW:
        found.append(Check(
            WEAK_SURROGATE, "warning",
            f"surrogate {surrogate.name} classifies {surrogate.clean_accuracy:.1%} of the audit samples correctly: "
            "its transfer attacks say little, and robust accuracy where only transfer attacks run may be overstated",
        ))
    if surrogate.zero_gradients:
        found.append(Check(
            SURROGATE_ZERO_GRADIENTS, "warning",
            f"surrogate {surrogate.name} has an all-zero input gradient of its logit margin on "
            f"{surrogate.zero_gradients} of {surrogate.checked} audit samples: transfer attacks cannot move "
            "from them, and robust accuracy where only transfer attacks run may be overstated",
        ))
    if surrogate.randomised:
        found.append(Check(
            RANDOMISED_SURROGATE, "warning",
            f"surrogate {surrogate.name} gave different outputs on identical passes: it is randomised "
            "(dropout left on?); its draws were seeded from --seed, but its examples were crafted on random "
            "variants of it: export it in eval mode",
        ))
    return found


def skipped_attacks(skipped: Sequence[tuple[str, str]]) -> list[Check]:
    return [
        Check(ATTACK_SKIPPED, "info", f"{label} was not run: {reason}")
        for label, reason in skipped
    ]


def no_gradient_attack(battery: "Battery") -> list[Check]:
    """A white-box battery in which no attack follows the model's gradients:
    each was skipped, or none was chosen."""
    if battery.level != Access.WHITE_BOX or any(attack.oracle is GradientOracle for attack in battery.attacks):
        return []
    skipped = [label for label, _ in battery.skipped if BY_LABEL[label].oracle is GradientOracle]
    why = f"{', '.join(skipped)} skipped, see attack-skipped" if skipped else "--attacks chose none"
    ran = ", ".join(attack.label for attack in battery.attacks)
    return [Check(
        NO_GRADIENT_ATTACK, "warning",
        f"no gradient-based attack ran at white-box access ({why}): robust accuracy rests on attacks "
        f"that do not use the model's gradients ({ran}) and is likely overstated",
    )]


def no_target_image(battery: "Battery", target: torch.Tensor | None, data_labels: torch.Tensor) -> list[Check]:
    """Targeted samples whose target class has no image in the data, which
    the attacks that start from a data image of the target need."""
    starting = [attack.label for attack in battery.attacks if attack.starts_from_data]
    if target is None or not starting:
        return []
    missing = ~torch.isin(target, data_labels)
    if not missing.any():
        return []
    classes = ", ".join(str(c) for c in torch.unique(target[missing]).tolist())
    return [Check(
        NO_TARGET_IMAGE, "warning",
        f"{int(missing.sum())} of the {len(target)} samples have a target class with no image in the data "
        f"(class {classes}): {', '.join(starting)} start from an image of the target class and could not "
        "attack them, so robust accuracy against those attacks is overstated",
    )]


def training_data_audited(overlap: int, audited: int, guard: int) -> list[Check]:
    """``overlap`` of the ``audited`` images of a hardening run's scans are
    training images, ``guard`` of them in the batch that chose the weights."""
    if not overlap:
        return []
    held_out = f" ({guard} of them in the guard batch that chose the weights)" if guard else ""
    return [Check(
        TRAINING_DATA_AUDITED, "warning",
        f"{overlap} of the {audited} audited images are also in the hardening run's training data{held_out}: "
        "accuracy on images the model was trained on overstates it on new ones; give --eval-data with "
        "held-out images",
    )]


def custom_battery(left_out: Sequence[str]) -> list[Check]:
    """The battery was chosen by name and leaves out default attacks."""
    if not left_out:
        return []
    return [Check(
        CUSTOM_BATTERY, "warning",
        f"--attacks left out {len(left_out)} attacks of the default battery ({', '.join(left_out)}): "
        "robust accuracy is only the worst case over the attacks chosen",
    )]


def access_limited(level: Access, reason: str) -> list[Check]:
    if level == Access.WHITE_BOX:
        return []
    if level == Access.NONE:
        return [Check(
            TRANSFER_ONLY, "warning",
            f"only transfer attacks from surrogate models ran ({reason}): they query the model only to submit "
            "each finished example, so robust accuracy is overstated against any attacker who can query it more",
        )]
    return [Check(
        ACCESS_LIMITED, "info",
        f"the audit ran at {level.cli_name} access ({reason}); "
        "attackers with more access were not evaluated",
    )]


def gradient_checks(model: Model, x: torch.Tensor, y: torch.Tensor) -> list[Check]:
    """Input gradients of the logit margin must be finite and not all zero.

    The margin, not the cross-entropy: a model with large logits has a
    softmax saturated to exactly 1 on its clean images, where the
    cross-entropy is flat although the attacks, which ascend margins, are not.

    A model whose forward or backward pass raises here is refused
    (:class:`GradientFailed`): the loss is the auditor's own, so the error
    is the model's.
    """
    x, y = x.to(model.device), y.to(model.device)
    try:
        _, grad = logits_and_gradient(
            model.torch_module(), x, lambda logits: logit_margin(logits, y)
        )
    except Exception as exc:
        raise GradientFailed(model.info.path, len(x), exc) from exc
    flat = grad.flatten(1)
    found = []
    nan = int((~torch.isfinite(flat)).any(dim=1).sum())
    if nan:
        found.append(Check(
            NAN_GRADIENTS, "error",
            f"{nan} of {len(y)} samples have NaN or infinite input gradients: "
            "white-box attacks cannot follow them, and their robust accuracy is meaningless",
        ))
    zero = int((flat == 0).all(dim=1).sum())
    if zero:
        found.append(Check(
            ZERO_GRADIENTS, "warning",
            f"{zero} of {len(y)} samples have an all-zero input gradient: a sign of gradient masking "
            "(e.g. input quantisation); the worst case must come from gradient-free attacks",
        ))
    return found


def weaker_attack_wins(
    records: "Records", reports: Sequence["AttackReport"], eps_list: Sequence[float]
) -> list[Check]:
    """A weaker-access attack broke, within some ε, samples the white-box
    attacks could not break within that ε.

    Per ε: samples whose record is within ε while the white-box attacks' own
    record is not. The final record then belongs to a weaker attack.
    """
    if not any(report.attack.access == Access.WHITE_BOX for report in reports):
        return []
    missed = {}
    for eps in sorted(eps_list):
        bound = eps_bound(eps)
        rows = ((records.distortion <= bound) & (records.white_box > bound)).nonzero().flatten()
        if len(rows):
            missed[eps] = rows
    if not missed:
        return []
    counts = ", ".join(f"{len(rows)} within ε={eps_text(eps)}" for eps, rows in missed.items())
    winners = records.broken_by[torch.cat(list(missed.values())).unique().numpy()].tolist()
    by_attack = ", ".join(f"{label} ({winners.count(label)})" for label in sorted(set(winners)))
    return [Check(
        WEAKER_ATTACK_WINS, "warning",
        f"weaker-access attacks broke samples the white-box attacks missed at the same ε: {counts}; "
        f"broken by {by_attack}; gradients may be masked",
    )]


def non_monotone(reports: Sequence["AttackReport"], randomised: bool = False) -> list[Check]:
    """An attack that broke samples at a smaller ε after failing on them at a
    larger one. Random noise is left out: it does not optimise, so its
    successes are chance at any ε (``noise-beats-attacks`` judges it)."""
    cause = ("the attack is not converging, or the model's randomness misleads it (randomised-model)"
             if randomised else "the attack is not converging")
    found = []
    for report in reports:
        if report.non_monotone and not report.attack.baseline:
            found.append(Check(
                NON_MONOTONE, "warning",
                f"{report.attack.label} broke {plural(report.non_monotone, 'sample')} at a smaller ε after "
                f"failing on {'it' if report.non_monotone == 1 else 'them'} at a larger one: {cause}, so larger-ε "
                "numbers overstate robustness",
            ))
    return found


def noise_beats_attacks(reports: Sequence["AttackReport"], could_not_start: bool = False) -> list[Check]:
    """Random noise broke samples the attacks before it missed. With
    ``could_not_start`` (``no-target-image`` fired) some attacks had no
    start image for some samples, which explains it as well as attacks
    that do not work."""
    why = ("the attacks are not working on this model, or could not start on samples whose target class has "
           "no image in the data (see no-target-image)" if could_not_start
           else "the attacks are not working on this model")
    found = []
    for position, report in enumerate(reports):
        if report.attack.baseline and report.broken and position > 0:
            found.append(Check(
                NOISE_BEATS_ATTACKS, "warning",
                f"uniform random noise broke {report.broken} samples that every attack before it missed: {why}",
            ))
    return found


def no_adversarial_found(records: "Records", reports: Sequence["AttackReport"]) -> list[Check]:
    """Samples the minimum-norm attacks ran on that no attack fooled at any distortion.

    A minimum-norm attack is unbounded: once it holds any adversarial image
    it only shrinks it. A sample it never fooled counts as robust at every ε,
    however large, because the attack found no way across the boundary
    within its budget, not because the model resisted a perturbation of
    that size.
    """
    min_norm = [r for r in reports if r.attack.kind == MIN_NORM and r.runs]
    labels = sorted({r.attack.label for r in min_norm})
    shown = sorted({p for r in min_norm for run in r.runs for p in run.positions})
    if not shown:
        return []
    never = int(torch.isinf(records.distortion[torch.tensor(shown)]).sum())
    if not never:
        return []
    return [Check(
        NO_ADVERSARIAL_FOUND, "warning",
        f"{never} of the {len(shown)} samples the minimum-norm attacks ({', '.join(labels)}) ran on were "
        "never misclassified at any distortion within the budget: they count as robust at every ε, "
        "so robust accuracy at the larger ε is the attacks' failure to start, not a property of the model",
    )]


UNBOUNDED_SAMPLES = 64


def unbounded_attack(
    model: Model, x: torch.Tensor, y: torch.Tensor, norm: str, seed: int, votes: int = 1
) -> list[Check]:
    """PGD with a radius covering the whole [0,1] cube must reach 100 %.

    Any image is then reachable, so a failure means the gradients do not lead
    anywhere (masking) or the attack is broken. A randomised model's labels
    are the most frequent of ``votes`` passes, as in the scan. The walk starts at the clean
    image, not at PGD's random start: a random start in a ball this large is
    a random image, which an undefended network may classify with a softmax
    saturated to exactly 1. It ascends the logit margin, not the
    cross-entropy, which such a softmax flattens to exactly 0 (a model with
    large logits is saturated on its clean images already).
    """
    module = model.torch_module()
    x, y = x[:UNBOUNDED_SAMPLES], y[:UNBOUNDED_SAMPLES]
    eps = 1.0 if norm == "linf" else float(x[0].numel()) ** 0.5
    attack = PGD(norm=norm, steps=20, random_start=False, loss="margin")
    result = attack(GradientOracle(module, len(y)), x.to(model.device), y.to(model.device), eps=eps, seed=seed)
    fooled = verify(model, x, result.x_adv, y, norm, votes=votes).fooled
    if bool(fooled.all()):
        return []
    return [Check(
        UNBOUNDED_ATTACK_FAILS, "warning",
        f"PGD with an unbounded radius (ε={eps:g} {norm}) fooled only {int(fooled.sum())} of {len(y)} "
        "samples; it should reach 100 %: gradients are masked or uninformative"
        + (", or the model's randomness misleads it (randomised-model)" if votes > 1 else ""),
    )]
