"""Report view data for the transfer matrix (``results["transfer"]``).

One heat map per ε: a row per transfer method, a column per surrogate set,
each cell the method's success rate on the target from that set, shaded by
it, with its gain over plain I-FGSM from the same set in percentage points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..eps import eps_text
from .formatting import MISSING, percent


@dataclass(frozen=True)
class HeatCell:
    text: str
    gain: str
    """Percentage points over the baseline from the same set ("" for the baseline)."""
    shade: str
    """A CSS colour: transparent at 0 %, the full accent at 100 %."""


@dataclass(frozen=True)
class TransferRow:
    method: str
    baseline: bool
    cells: tuple[HeatCell, ...]


@dataclass(frozen=True)
class TransferMatrix:
    eps: str
    samples: int
    rows: tuple[TransferRow, ...]
    best: str
    """One sentence: the best cell other than the baseline's and its gain over the baseline."""


@dataclass(frozen=True)
class SurrogateRow:
    name: str
    source: str
    sha256: str
    """Of the weights; a dash in results written before it was recorded."""
    clean_accuracy: str


@dataclass(frozen=True)
class TransferView:
    sets: tuple[str, ...]
    surrogates: tuple[SurrogateRow, ...]
    matrices: tuple[TransferMatrix, ...]
    baseline: str | None
    ran_on: str
    """Which surrogate sets each method ran on, in words ("each surrogate alone and their ensemble")."""


def _shade(rate: float) -> str:
    return f"rgba(178, 34, 34, {0.08 + 0.72 * rate:.2f})"


def _best(methods: dict, sets: list[str], baseline: str | None) -> str:
    """The sentence on the best cell of one matrix, "" when it has none.

    The best cell is the highest rate of a method other than the baseline
    (of the baseline only when it ran alone), ties going to the larger gain
    over the baseline from the same set. Its gain is stated when some cell
    beats the baseline; when none does, the sentence says so instead. Cells
    that tie on both are all named; when every cell ties, no cell is best.
    """
    base = methods.get(baseline, {})
    gains = {
        (method, group): rate - base[group]
        for method, rates in methods.items()
        if method != baseline
        for group, rate in rates.items()
        if rate is not None and group in base
    }
    searched = [method for method in methods if method != baseline] or list(methods)
    candidates = [
        (methods[method][group], gains.get((method, group), -math.inf), method, group)
        for method in searched
        for group in sets
        if methods[method].get(group) is not None
    ]
    if not candidates:
        return ""
    rate, gain, method, group = max(candidates, key=lambda cell: cell[:2])
    tied = [f"{other} from {other_group}" for other_rate, other_gain, other, other_group in candidates
            if (other_rate, other_gain) == (rate, gain)]
    if len(tied) == len(candidates) > 1:
        methods_named = "every method" if searched == list(methods) else f"every method but {baseline}"
        sentence = f"No best cell: {methods_named} fooled {percent(rate)} of the samples from every surrogate set"
    elif len(tied) > 1:
        sentence = f"Best, tied: {', '.join(tied)}, {percent(rate)} of the samples"
    else:
        sentence = f"Best: {method} from {group}, {percent(rate)} of the samples"
    if not gains:
        return sentence + "."
    if max(gains.values()) <= 0:
        return sentence + f"; no method beats {baseline} from the same surrogates."
    if (method, group) not in gains:
        return sentence + "."
    return sentence + (
        f", against {percent(base[group])} for {baseline} ({100 * gains[method, group]:+.1f} points)."
    )


def _matrix(eps: str, samples: int, methods: dict, sets: list[str], baseline: str | None) -> TransferMatrix:
    base = methods.get(baseline, {})
    rows = []
    for method, rates in methods.items():
        cells = []
        for group in sets:
            rate = rates.get(group)
            gain = ""
            if rate is not None and method != baseline and group in base:
                gain = f"{100 * (rate - base[group]):+.1f}"
            cells.append(HeatCell(percent(rate), gain, _shade(rate or 0.0)))
        rows.append(TransferRow(method, method == baseline, tuple(cells)))
    return TransferMatrix(eps_text(eps), samples, tuple(rows), _best(methods, sets, baseline))


def transfer_view(results: dict) -> TransferView | None:
    transfer = results.get("transfer")
    if not transfer:
        return None
    sets = list(transfer["sets"])
    baseline = transfer.get("baseline")
    matrices = tuple(
        _matrix(eps, transfer["samples"].get(eps, 0), methods, sets, baseline)
        for eps, methods in transfer["matrix"].items()
        if methods
    )
    surrogates = tuple(
        SurrogateRow(s["name"], s["source"], s.get("sha256") or MISSING, percent(s.get("clean_accuracy")))
        for s in transfer["surrogates"]
    )
    if len(sets) == 1:
        ran_on = f"the one surrogate, {sets[0]} (with a single surrogate there is no ensemble)"
    else:
        ran_on = "each surrogate alone and on their ensemble"
    return TransferView(tuple(sets), surrogates, matrices, baseline, ran_on)
