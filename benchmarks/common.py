"""The benchmarks' one shared CLI/report module: the torchrun entry boilerplate, machine
description, timing loops, statistics, tables and result files.

Nothing here starts processes; the multi-rank benchmarks are ``torchrun`` entry points
(:func:`run_under_torchrun`) and :mod:`benchmarks.__main__` launches them with
``python -m torch.distributed.run``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "now_iso",
    "today",
    "default_out",
    "loadavg",
    "machine_info",
    "machine_lines",
    "summarize_ms",
    "paired_ratio",
    "time_interleaved",
    "max_over_ranks",
    "print_table",
    "markdown_table",
    "write_results",
    "fmt_bytes",
    "fmt_ratio",
    "run_under_torchrun",
    "fill_defaults",
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(world_size: int = 1, backend: Optional[str] = None) -> dict[str, Any]:
    """Platform, CPU model (``/proc/cpuinfo``), cores, torch and Python versions, world size, backend,
    threads per rank, and the load average at the time of the call."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "world_size": world_size,
        "backend": backend or "none",
        "threads_per_rank": torch.get_num_threads(),
        "loadavg": loadavg(),
    }


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
    """Median, quartiles (inclusive method), IQR, min and mean of times in seconds, in milliseconds."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {
        "median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
        "min_ms": ms[0], "mean_ms": statistics.fmean(ms), "n_steps": len(ms),
    }


def paired_ratio(num_s: Sequence[float], den_s: Sequence[float], block: int) -> dict[str, float]:
    """Ratio of two interleaved variants, paired by round: less sensitive to slow load drifts.

    Step ``i`` of every variant ran in round ``i // block`` (the variants take turns in blocks), so
    the block medians of one round were measured seconds apart. Returns the median over rounds of
    ``median(num block) / median(den block)``, with the smallest and largest round ratio.
    """
    ratios = []
    for start in range(0, min(len(num_s), len(den_s)), block):
        a, b = num_s[start:start + block], den_s[start:start + block]
        ratios.append(statistics.median(a) / statistics.median(b))
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


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


def fill_defaults(args: Any, **defaults: tuple[Any, Any]) -> Any:
    """Set each option left ``None`` on the command line to its ``(full, quick)`` default, by ``--quick``."""
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def run_under_torchrun(prog: str, run: Callable[[], dict[str, Any]], report: Callable[[dict[str, Any]], None],
                       *, backend: str = "gloo", timeout_s: float = 600.0,
                       min_world: int = 2) -> Optional[dict[str, Any]]:
    """The multi-rank benchmarks' ``main``: join torchrun's process group, ``run()`` on every rank,
    ``report(results)`` on rank 0, then a barrier and an explicit teardown (a live gloo group at
    interpreter exit can abort the process). Returns the results, or ``None`` (with a message)
    when not started by torchrun.

    Args:
        prog: the module, for messages (``benchmarks.step``).
        backend: ``gloo`` (one thread per rank) or ``nccl`` (the rank's ``LOCAL_RANK`` GPU).
        min_world: the smallest world size the benchmark accepts.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print(f"{prog}: expected to be started by torchrun, e.g. `torchrun --nproc_per_node=2 -m {prog}`",
              file=sys.stderr)
        return None
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        if dist.get_world_size() < min_world:
            raise RuntimeError(f"{prog}: expected a world size >= {min_world}, got {dist.get_world_size()}")
        results = run()
        if dist.get_rank() == 0:
            report(results)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return results
