"""Terminal output of the ``attncap`` commands: progress over steps and result tables."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator, Sequence

__all__ = ["Steps", "print_table", "short"]


class Steps:
    """Progress over a fixed number of steps: rich on a terminal, tqdm if rich is missing,
    else (and when stderr is not a terminal) one plain line per step."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self._rich = self._tqdm = None
        if sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

                self._rich = Progress(
                    SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=False,
                )
            except ImportError:
                try:
                    from tqdm import tqdm

                    self._tqdm = tqdm(total=total, file=sys.stderr, bar_format="{desc} {bar} {n}/{total} [{elapsed}]")
                except ImportError:
                    pass

    def __enter__(self) -> "Steps":
        if self._rich is not None:
            self._rich.__enter__()
            self._task = self._rich.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
        elif self._tqdm is not None:
            self._tqdm.close()

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        started = time.perf_counter()
        if self._rich is not None:
            self._rich.update(self._task, description=description)
        elif self._tqdm is not None:
            self._tqdm.set_description_str(description)
        else:
            print(f"[{self.done + 1}/{self.total}] {description} ...", file=sys.stderr, flush=True)
        yield
        self.done += 1
        if self._rich is not None:
            self._rich.advance(self._task)
        elif self._tqdm is not None:
            self._tqdm.update(1)
        else:
            print(f"[{self.done}/{self.total}] {description}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[bool] | None = None) -> None:
    """A table on stdout: rich when installed, else aligned plain text."""
    right = list(right) if right is not None else [False] + [True] * (len(columns) - 1)
    # (+ 0.0 turns -0.0 into 0.0)
    cells = [[c if isinstance(c, str) else f"{c + 0.0:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(columns)]

        def fmt(values):
            return "  ".join(v.rjust(w) if rj else v.ljust(w) for v, w, rj in zip(values, widths, right))

        print(title)
        print(fmt(columns))
        print("  ".join("-" * w for w in widths))
        for r in cells:
            print(fmt(r))
        return
    table = Table(title=title, title_justify="left")
    for name, rj in zip(columns, right):
        # Numbers never wrap; text columns are cut with an ellipsis when space is short.
        table.add_column(name, justify="right" if rj else "left", no_wrap=True, overflow="ellipsis" if not rj else "crop")
    for r in cells:
        table.add_row(*r)
    # At least 120 columns even on a narrower terminal (which then wraps the lines): a squeezed
    # table would cut the numbers. A pipe or file gets room for the whole table.
    import shutil

    width = max(120, shutil.get_terminal_size((120, 24)).columns) if sys.stdout.isatty() else 160
    Console(width=width).print(table)


def short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
