"""One command for the benchmark suite: ``python -m benchmarks all [--quick] [--out DIR]``.

Sub-commands:

* ``all``: every part below, one after the other, into ``--out`` (default
  ``benchmarks/results/<date>/``), then a summary ``results.json`` / ``results.md`` there.
* ``layer``: per-layer forward+backward time (``torchrun``, 2 ranks, with a W=1 part).
* ``step``: DDP training-step time of ResNet-18 and ResNet-50 (``torchrun``, 2 ranks).
* ``scaling``: alpha-beta fit of the backend's collectives and projected ResNet-50 sync cost
  (``torchrun``, 2 ranks; writes ``scaling.png``).
* ``memory``: saved-for-backward bytes and peak memory per layer (one process, W=1).

The multi-rank parts are started with ``python -m torch.distributed.run --standalone
--nproc_per_node=N -m benchmarks.<part>``; each writes ``results.json`` and ``results.md`` into
its own folder under ``--out`` and prints its tables, which this command passes through (and keeps in
``<part>/log.txt``). Arguments after ``--`` go to every sub-benchmark that is run, e.g.
``python -m benchmarks layer -- --channels 64 128``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from . import common

PARTS = ("layer", "step_resnet18", "step_resnet50", "scaling", "memory")
"""Every part ``all`` runs, in order."""

COMMANDS = {"all": PARTS, "layer": ("layer",), "step": ("step_resnet18", "step_resnet50"),
            "scaling": ("scaling",), "memory": ("memory",)}

QUICK_ARGS = {
    "layer": ["--quick", "--channels", "64", "256", "--spatial", "8", "16"],
    "step_resnet18": ["--quick", "--width", "16", "--batch", "4", "--image", "16"],
    "step_resnet50": ["--quick", "--width", "8", "--batch", "2", "--image", "8"],
    "scaling": ["--quick"],
    "memory": ["--quick", "--channels", "64", "1024", "--spatial", "8"],
}
"""What ``--quick`` passes to each part: a smoke run that checks the plumbing in well under a minute."""

FULL_ARGS = {
    "layer": [],
    "step_resnet18": [],
    "step_resnet50": ["--steps", "30"],
    "scaling": [],
    "memory": [],
}


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="parts of `all`: " + ", ".join(PARTS))
    p.add_argument("command", choices=list(COMMANDS), help="what to run")
    p.add_argument("--quick", action="store_true", help="a short smoke run of each part")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results/<date>/)")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the multi-rank parts (default: 2)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed per part before it is stopped (default: none; --quick: 240)")
    p.add_argument("--skip", nargs="+", default=[], choices=list(PARTS), help="parts to leave out")
    args = p.parse_args(argv)
    if args.nproc < 2:
        p.error(f"expected --nproc >= 2, got {args.nproc}")
    if args.timeout is None and args.quick:
        args.timeout = 240.0
    return args, extra


def part_command(part: str, out: Path, quick: bool, nproc: int, extra: Sequence[str]) -> list[str]:
    """The command line that runs ``part`` with its results in ``out``."""
    args = list(QUICK_ARGS[part] if quick else FULL_ARGS[part]) + ["--out", str(out)] + list(extra)
    if part == "memory":
        return [sys.executable, "-m", "benchmarks.memory", *args]
    module = "benchmarks.step" if part.startswith("step_") else f"benchmarks.{part}"
    if part.startswith("step_"):
        args = ["--model", part.split("_", 1)[1], *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


def _env() -> dict[str, str]:
    """The sub-benchmarks' environment: this syncnorm on the path, one thread per rank, loopback."""
    root = str(Path(__file__).resolve().parents[1])  # the repository: benchmarks/ and syncnorm/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    return env


def run_part(part: str, cmd: list[str], out: Path, timeout: Optional[float]) -> dict[str, Any]:
    """Run ``cmd``, echoing and logging its output; stop its process group after ``timeout`` s."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.txt"
    print(f"\n=== {part}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    load = common.loadavg()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                start_new_session=True)

        def kill() -> None:
            nonlocal timed_out
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the part's own session: torchrun and its ranks
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
    results = out / "results.json"
    status = "timed out" if timed_out else "ok" if rc == 0 and results.exists() else f"failed (exit {rc})"
    return {"command": cmd, "returncode": rc, "status": status, "wall_s": round(time.perf_counter() - t0, 2),
            "loadavg_before": load, "loadavg_after": common.loadavg(), "log": str(log_path),
            "results": str(results) if results.exists() else None}


# ------------------------------------------------------------------------------------- headlines


def headline(part: str, res: dict[str, Any]) -> list[str]:
    """The few numbers of a part that the summary shows."""
    if part == "layer":
        return list(res.get("summary", []))
    if part.startswith("step_"):
        r, v, c = res["ratios"], res["variants"], res["correctness"]
        cfg = res["config"]
        return [
            f"{cfg['model']} (batch {cfg['batch']}/rank, {cfg['image']}x{cfg['image']}, {cfg['bn_layers']} BN layers, "
            f"{cfg['bn_channels']} channels): median step ms local {v['local']['median_ms']:.1f}, floor "
            f"{v['floor']['median_ms']:.1f}, syncnorm {v['syncnorm']['median_ms']:.1f}, naive {v['naive']['median_ms']:.1f}",
            f"syncnorm / floor = {r['syncnorm_over_floor']:.3f} (paired {r['syncnorm_over_floor_paired']['median']:.3f}; "
            f"goal <= {r['goal_syncnorm_over_floor']:.2f}: {'met' if r['syncnorm_over_floor_ok'] else 'NOT met'}); "
            f"syncnorm / naive = {r['syncnorm_over_naive']:.3f}; syncnorm / local = {v['syncnorm']['ratio_to_local']:.3f}",
            f"parity syncnorm vs naive: max |loss diff| {c['max_abs_loss_diff']:.1e} ({'PASSED' if c['passed'] else 'FAILED'})",
        ]
    if part == "scaling":
        f = res["fit"]
        lines = [f"fit {k}: alpha = {f[k]['alpha_s'] * 1e6:.1f} us, beta = {f[k]['beta_s_per_byte'] * 1e9:.4f} ns/B "
                 f"(R^2 {f[k]['r2']:.3f})" for k in ("all_reduce", "all_gather")]
        ws = res["world_sizes"]
        for model in ("ring", "tree", "mixed"):
            p = res["projection"][model]
            for w in (8, 1024):
                if w in ws:
                    i = ws.index(w)
                    lines.append(f"{model} model, W={w}: syncnorm {p['syncnorm'][i] * 1e3:.1f} ms, torch "
                                 f"{p['torch'][i] * 1e3:.1f} ms, naive {p['naive'][i] * 1e3:.1f} ms per step")
        lines.append(f"plot: {res.get('plot')}")
        return lines
    if part == "memory":
        last = res["rows"][-1]
        e = last["variants"]
        return [
            f"goal ({res['goal']}): {'met' if res['goal_met'] else 'NOT met'}",
            f"C={last['C']}, {last['H']}x{last['W']}: saved new bytes local {e['local']['new_bytes']:,}, syncnorm "
            f"{e['syncnorm']['new_bytes']:,}, naive_allgather {e['naive_allgather']['new_bytes']:,}; peak / local: "
            + ", ".join(f"{v} {common.fmt_ratio(e[v]['peak_over_local'])}" for v in res["variants"]),
        ]
    return []


def summary_markdown(summary: dict[str, Any], out: Path) -> str:
    lines = [
        f"# syncnorm benchmarks{' (quick)' if summary['quick'] else ''}",
        "",
        f"- date: {summary['date']}",
        *common.machine_lines(summary["machine"]),
        f"- load average (1/5/15 min) at the end: {' / '.join(f'{x:.2f}' for x in summary['loadavg_after'])}",
        f"- command: `{summary['command']}`; wall time {summary['wall_s']:.1f} s",
        "",
        "| part | status | wall s | load before -> after (1 min) |",
        "|---|---|---|---|",
    ]
    for name, p in summary["parts"].items():
        lb = p["loadavg_before"][0] if p["loadavg_before"] else float("nan")
        la = p["loadavg_after"][0] if p["loadavg_after"] else float("nan")
        lines.append(f"| {name} | {p['status']} | {p['wall_s']:.1f} | {lb:.2f} -> {la:.2f} |")
    lines.append("")
    for name, p in summary["parts"].items():
        lines += [f"## {name}", ""]
        lines += [f"- {h}" for h in p.get("headline", [])] or ["- (no results)"]
        lines += [f"- command: `{' '.join(p['command'])}`", ""]
    for name, p in summary["parts"].items():
        md = out / name / "results.md"
        if md.exists():
            body = md.read_text().replace("\n#", "\n##")
            lines += ["---", "", "#" + body if body.startswith("#") else body, ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra = parse_args(argv)
    out: Path = args.out or common.default_out()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = common.machine_info(args.nproc, "gloo")
    machine["threads_per_rank"] = 1  # what every sub-benchmark sets (this process may use more)
    parts: dict[str, Any] = {}
    for part in COMMANDS[args.command]:
        if part in args.skip:
            continue
        cmd = part_command(part, out / part, args.quick, args.nproc, extra)
        entry = run_part(part, cmd, out / part, args.timeout)
        if entry["results"]:
            try:
                entry["headline"] = headline(part, json.loads(Path(entry["results"]).read_text()))
            except (KeyError, ValueError, IndexError, TypeError) as err:
                entry["headline"] = [f"(could not summarize: {err!r})"]
        parts[part] = entry
    summary = {
        "benchmark": "benchmarks",
        "date": common.now_iso(),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "machine": machine,
        "loadavg_after": common.loadavg(),
        "wall_s": round(time.perf_counter() - t0, 2),
        "parts": parts,
    }
    common.write_results(summary, summary_markdown(summary, out), out)
    rows = [[name, p["status"], f"{p['wall_s']:.1f}", "\n".join(p.get("headline", []))] for name, p in parts.items()]
    common.print_table(f"syncnorm benchmarks: summary ({out})", ["part", "status", "wall s", "headline"], rows,
                       [f"total wall time {summary['wall_s']:.1f} s; load average now "
                        f"{' / '.join(str(x) for x in summary['loadavg_after'])}",
                        f"wrote {out / 'results.json'} and {out / 'results.md'}"], left=(0, 1, 3))
    return 0 if all(p["status"] == "ok" for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
