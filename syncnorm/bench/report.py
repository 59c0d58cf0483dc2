"""Summaries and output of the step benchmark: statistics, machine description, table, files.

Pure functions of the gathered numbers (nothing here communicates); only rank 0 calls them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["summarize", "paired_ratio", "machine_info", "print_table", "write_results", "COLUMNS"]

COLUMNS = (
    "median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "mean_ms", "n_steps", "ratio_to_local",
    "collectives_per_step", "bytes_per_step", "counted_collectives_per_step", "counted_bytes_per_step",
)
"""Keys of every variant's entry in ``results.json``."""


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method), IQR, min and mean of step times, in milliseconds."""
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(world_size: int, backend: str) -> dict[str, Any]:
    """Platform, CPU model (``/proc/cpuinfo``), cores, torch and Python versions, world size."""
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
        "backend": backend,
        "threads_per_rank": torch.get_num_threads(),
    }


def _fmt_bytes(n: int) -> str:
    return f"{n:,} B" if n < 10_000 else f"{n / 1024:,.1f} KiB"


def _rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, v in results["variants"].items():
        counted = v["counted_collectives_per_step"]
        match = "" if counted == v["collectives_per_step"] and v["counted_bytes_per_step"] == v["bytes_per_step"] else " (!)"
        rows.append([
            name, f"{v['median_ms']:.1f}", f"{v['iqr_ms']:.1f}", f"{v['min_ms']:.1f}", f"{v['ratio_to_local']:.3f}",
            str(v["collectives_per_step"]), _fmt_bytes(v["bytes_per_step"]), f"{counted}{match}",
        ])
    return rows


_HEADER = ["variant", "median ms", "IQR ms", "min ms", "x local", "coll/step", "bytes/step", "counted"]


def _paired(p: dict[str, float]) -> str:
    return f"paired by round: {p['median']:.3f} (range {p['min']:.2f}-{p['max']:.2f}, {p['rounds']} rounds)"


def _summary_lines(results: dict[str, Any]) -> list[str]:
    r, c = results["ratios"], results["correctness"]
    goal = r["goal_syncnorm_over_floor"]
    return [
        f"model: {results['config']['model_source']}",
        f"syncnorm / floor = {r['syncnorm_over_floor']:.3f} (goal <= {goal:.2f}: "
        f"{'met' if r['syncnorm_over_floor_ok'] else 'NOT met'}); {_paired(r['syncnorm_over_floor_paired'])}",
        f"syncnorm / naive = {r['syncnorm_over_naive']:.3f}; {_paired(r['syncnorm_over_naive_paired'])}",
        f"check: losses syncnorm {c['loss_syncnorm']}, naive {c['loss_naive']} (rank mean per step)",
        f"check: max |loss diff| {c['max_abs_loss_diff']:.2e} (tolerance {c['tolerance']:.0e}): "
        f"{'PASSED' if c['passed'] else 'FAILED'}; max |param diff| after {c['steps']} steps "
        f"{c['max_abs_param_diff']:.2e}",
    ]


def print_table(results: dict[str, Any]) -> None:
    """Print the results table (rich when installed, plain text otherwise)."""
    cfg = results["config"]
    title = (f"step time, {cfg['model']} batch {cfg['batch']}/rank {cfg['image']}x{cfg['image']}, "
             f"{results['machine']['world_size']} ranks {results['machine']['backend']}, "
             f"{cfg['steps']} steps/variant")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(_markdown_table(results))
        print("\n".join(_summary_lines(results)))
        return
    table = Table(title=title)
    for i, h in enumerate(_HEADER):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in _rows(results):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the table, no wrapping
        console = Console(width=max(console.width, 110))
    console.print(table)
    for line in _summary_lines(results):
        console.print(line, highlight=False)


def _markdown_table(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    return "\n".join(lines)


def _markdown(results: dict[str, Any]) -> str:
    m, cfg, t = results["machine"], results["config"], results["timing"]
    return "\n".join([
        f"# Step-time benchmark: {cfg['model']}, {m['world_size']} ranks on {m['backend']}",
        "",
        f"- date: {results['date']}",
        f"- machine: {m['platform']}; CPU {m['cpu_model']}, {m['cpu_cores']} cores "
        f"({m['cpu_cores_usable']} usable); torch {m['torch']}, Python {m['python']}; "
        f"world size {m['world_size']}, {m['threads_per_rank']} thread(s) per rank",
        f"- model: {cfg['model_source']}; {cfg['bn_layers']} BN layers, {cfg['bn_channels']} channels",
        f"- batch {cfg['batch']} per rank, {cfg['image']}x{cfg['image']} images, {cfg['warmup']} warm-up "
        f"steps per variant, {cfg['steps']} timed steps per variant in blocks of {cfg['block']} "
        f"(round-robin, rotating start)",
        f"- load average (1 min) before/after: {t['loadavg_before']:.2f} / {t['loadavg_after']:.2f}; "
        f"wall time {t['wall_s']:.1f} s",
        f"- command: `{results['command']}`",
        "",
        _markdown_table(results),
        "",
        *[f"- {line}" for line in _summary_lines(results)],
        "",
        f"Timing: {t['method']}. Ratios are of medians; `paired by round` is the median over "
        "rounds of the ratio of the two variants' block medians in that round (measured seconds "
        "apart, so less sensitive to load that drifts during the run).",
        "",
        "Collectives: norm-layer collectives per step, payload bytes per rank (elements x element "
        "size; a ring all-reduce moves about 2(W-1)/W times that). `counted` is the number seen at "
        "run time by wrapping `torch.distributed.all_reduce` during one step ((!) = differs from the "
        "analytic count). DDP's gradient buckets and buffer broadcasts are the same for every variant "
        "and not included.",
        "",
    ])


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` (created); return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "results.json", out_dir / "results.md"
    js.write_text(json.dumps(results, indent=2) + "\n")
    md.write_text(_markdown(results))
    return js, md
