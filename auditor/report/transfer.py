"""Report view data for the transfer matrix (``results["transfer"]``).

One heat map per ε: a row per transfer method, a column per surrogate set,
each cell the method's success rate on the target from that set, shaded by
it, with its gain over plain I-FGSM from the same set in percentage points.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..eps import eps_text


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
    """One sentence: the best cell and its gain over the baseline."""


@dataclass(frozen=True)
class SurrogateRow:
    name: str
    source: str
    clean_accuracy: str


@dataclass(frozen=True)
class TransferView:
    sets: tuple[str, ...]
    surrogates: tuple[SurrogateRow, ...]
    matrices: tuple[TransferMatrix, ...]
    baseline: str | None


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _shade(rate: float) -> str:
    return f"rgba(178, 34, 34, {0.08 + 0.72 * rate:.2f})"


def _matrix(eps: str, samples: int, methods: dict, sets: list[str], baseline: str | None) -> TransferMatrix:
    base = methods.get(baseline, {})
    rows, best = [], None
    for method, rates in methods.items():
        cells = []
        for group in sets:
            rate = rates.get(group)
            gain = ""
            if rate is not None and method != baseline and group in base:
                gain = f"{100 * (rate - base[group]):+.1f}"
            cells.append(HeatCell(_percent(rate), gain, _shade(rate or 0.0)))
            if rate is not None and (best is None or rate > best[0]):
                best = (rate, method, group)
        rows.append(TransferRow(method, method == baseline, tuple(cells)))
    sentence = ""
    if best is not None:
        rate, method, group = best
        sentence = f"Best: {method} from {group}, {_percent(rate)} of the samples"
        if baseline is not None and group in base:
            sentence += f", against {_percent(base[group])} for {baseline} ({100 * (rate - base[group]):+.1f} points)"
        sentence += "."
    return TransferMatrix(eps_text(eps), samples, tuple(rows), sentence)


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
        SurrogateRow(s["name"], s["source"], _percent(s.get("clean_accuracy"))) for s in transfer["surrogates"]
    )
    return TransferView(tuple(sets), surrogates, matrices, baseline)
