"""Helpers shared by the benchmarks: machine description, timing loops, tables and result files.

Nothing here starts processes; the multi-rank benchmarks are ``torchrun`` entry points and
:mod:`syncnorm.bench.__main__` launches them with ``python -m torch.distributed.run``.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from . import report

__all__ = [
    "now_iso",
    "today",
    "default_out",
    "loadavg",
    "machine_info",
    "machine_lines",
    "summarize_ms",
    "time_interleaved",
    "max_over_ranks",
    "print_table",
    "markdown_table",
    "write_results",
    "fmt_bytes",
    "fmt_ratio",
]


def now_iso() -> str:
    """Local date and time, ISO 8601 with the UTC offset, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def today() -> str:
    """``YYYY-MM-DD`` (local time): the default results folder name."""
    return datetime.date.today().isoformat()


def default_out() -> Path:
    """``benchmarks/results/<date>/`` relative to the working directory."""
    return Path("benchmarks") / "results" / today()


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (``[]`` where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def machine_info(world_size: int = 1, backend: Optional[str] = None) -> dict[str, Any]:
    """:func:`syncnorm.bench.report.machine_info` plus the load average at the time of the call."""
    info = report.machine_info(world_size, backend or "none")
    info["loadavg"] = loadavg()
    return info


def machine_lines(m: Mapping[str, Any]) -> list[str]:
    """Markdown bullet lines describing the machine."""
    load = m.get("loadavg") or []
    return [
        f"- machine: {m['platform']}; CPU {m['cpu_model']}, {m['cpu_cores']} cores "
        f"({m['cpu_cores_usable']} usable); torch {m['torch']}, Python {m['python']}",
        f"- processes: world size {m['world_size']} ({m['backend']}), {m['threads_per_rank']} thread(s) each",
        f"- load average (1/5/15 min) at start: {' / '.join(f'{x:.2f}' for x in load) or 'n/a'}",
    ]


def summarize_ms(times_s: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, IQR, min and mean in milliseconds (see :func:`report.summarize`)."""
    return report.summarize(times_s)


def time_interleaved(fns: Mapping[str, Callable[[], Any]], reps: int, block: int) -> dict[str, list[float]]:
    """Per-call wall times (s) of each callable, the callables taking turns in blocks of ``block``.

    The first callable of a round rotates, so a slow phase of a shared machine is spread over all
    of them. Every rank of a multi-rank benchmark must pass the same names in the same order (the
    callables that communicate then meet in the same order).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    r = 0
    while any(len(t) < reps for t in times.values()):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            for _ in range(min(block, reps - len(times[k]))):
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
        r += 1
    return times


def max_over_ranks(values: Sequence[float], group: Any = None) -> list[float]:
    """Element-wise maximum over the ranks of ``group`` (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def fmt_bytes(n: float) -> str:
    """``1,234 B`` below 10 kB, else KiB or MiB."""
    if n < 10_000:
        return f"{int(n):,} B"
    if n < 10 * 2**20:
        return f"{n / 1024:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB"


def fmt_ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                notes: Sequence[str] = (), left: Sequence[int] = (0,)) -> None:
    """Print a table with rich (plain markdown when rich is missing), then the notes.

    Columns whose index is in ``left`` are left-aligned, the others right-aligned.
    """
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(markdown_table(header, rows))
        for line in notes:
            print(line)
        return
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in left else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the table, no wrapping
        console = Console(width=max(console.width, 180))
    console.print(table)
    for line in notes:
        console.print(line, highlight=False, markup=False)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(results: Mapping[str, Any], markdown: str, out_dir: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` (created); return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "results.json", out_dir / "results.md"
    js.write_text(json.dumps(results, indent=2) + "\n")
    md.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return js, md


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)
