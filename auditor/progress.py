"""Progress display for long runs: one rich bar per attack run, or one per hardening run.

Library code reports progress only through these classes; with ``enabled``
false (the default when stderr is not a terminal) it draws nothing.
"""

from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ScanProgress:
    def __init__(self, enabled: bool):
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("queries"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )

    def __enter__(self) -> "ScanProgress":
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def run(self, description: str, total: int | None) -> Callable[[int], None]:
        """Start a bar; the returned callback advances it by a number of queries."""
        task = self._bar.add_task(description, total=total)
        return lambda count: self._bar.advance(task, count)


class TrainingProgress:
    """One rich bar over a hardening run's updates, showing the epoch, the
    training loss and the guard's latest PGD accuracy."""

    def __init__(self, enabled: bool, description: str, total: int):
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]}"),
            TextColumn("guard PGD acc {task.fields[pgd]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self._task = self._bar.add_task(description, total=total, epoch=0, loss="-", pgd="-")

    def __enter__(self) -> "TrainingProgress":
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def advance(self, updates: int = 1, *, epoch: int | None = None, loss: float | None = None,
                pgd: float | None = None) -> None:
        """Advance by ``updates`` and show whichever of epoch, loss and PGD accuracy are given."""
        fields = {}
        if epoch is not None:
            fields["epoch"] = epoch
        if loss is not None:
            fields["loss"] = f"{loss:.3f}"
        if pgd is not None:
            fields["pgd"] = f"{pgd:.1%}"
        self._bar.update(self._task, advance=updates, **fields)
