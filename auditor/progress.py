"""Progress display for long runs: one rich bar per attack run.

Library code reports progress only through this class; with ``enabled``
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
