"""The small-batch study: which normalization survives 2 samples per device?

    python -m benchmarks.study [--seeds 3] [--epochs 3] [--quick] [--out DIR] [--wandb]

Runs the training application (``python -m syncnorm.train experiment=small_batch_study``) on
scikit-learn's digits with the project's ResNet-18, same seed, data order and epochs for every
method:

* per-device batch 2 on 2 CPU ranks (``torchrun``): local BatchNorm, SyncBatchNorm, GhostBatchNorm
  (virtual batch 2), BatchRenorm, GroupNorm;
* single process: BatchNorm at batch 4 (the global batch of the 2x2 runs: SyncBatchNorm must
  reproduce it) and at batch 64 (learning rate scaled linearly).

Each run logs to CSV; the driver collects validation accuracy per epoch and writes, under
``--out`` (default ``benchmarks/results/<date>/study``): ``results.json``, ``results.md`` (final
validation accuracy mean +- std over seeds, wall time) and ``accuracy.png`` (validation accuracy vs
training samples seen, mean over seeds, one line per method). ``--wandb`` also logs the table and
the plot to an (offline unless configured) W&B run. ``--quick`` is a smoke test: one seed, a few
batches, the two methods whose curves must coincide.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .common import default_out, machine_info, machine_lines, markdown_table, print_table, write_results


@dataclass(frozen=True)
class Method:
    name: str
    procs: int  # 2: torchrun with 2 CPU ranks; 1: one process
    overrides: tuple[str, ...] = field(default_factory=tuple)


BASE_LR = 0.0125  # the experiment's lr for a global batch of 4 (0.1 x 4 / 32)

METHODS = (
    Method("BN local (2x2)", 2, ("norm=batch",)),
    Method("SyncBN (2x2)", 2, ("norm=sync",)),
    Method("GhostBN vbs 2 (2x2)", 2, ("norm=ghost", "norm.virtual_batch_size=2")),
    Method("BatchRenorm (2x2)", 2, ("norm=renorm",)),
    Method("GroupNorm (2x2)", 2, ("norm=group",)),
    Method("BN batch 4 (1 proc)", 1, ("norm=batch", "trainer=cpu", "data.batch_size=4")),
    Method("BN batch 64 (1 proc)", 1, ("norm=batch", "trainer=cpu", "data.batch_size=64", f"model.lr={BASE_LR * 16}")),
)
QUICK = ("SyncBN (2x2)", "BN batch 4 (1 proc)")  # the pair whose curves must coincide


def _command(method: Method, run_dir: Path, seed: int, epochs: int, extra: Sequence[str]) -> list[str]:
    app = ["-m", "syncnorm.train", "experiment=small_batch_study", *method.overrides, f"seed={seed}",
           f"trainer.max_epochs={epochs}", "logger=csv", "callbacks=none", f"hydra.run.dir={run_dir}", *extra]
    if method.procs == 1:
        return [sys.executable, *app]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={method.procs}", *app]


def _read_curve(run_dir: Path) -> list[dict]:
    """``[{epoch, step, samples, val_acc}]`` from the run's CSV log."""
    path = next(run_dir.rglob("metrics.csv"))
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("val/acc"):
                rows.append({"epoch": int(float(row.get("epoch") or 0)), "step": int(row["step"]),
                             "val_acc": float(row["val/acc"])})
    return rows


def run_study(methods: Sequence[Method], seeds: Sequence[int], epochs: int, out: Path,
              extra: Sequence[str] = (), timeout_s: float = 3600) -> dict:
    results: dict = {"methods": {}, "seeds": list(seeds), "epochs": epochs, "extra_overrides": list(extra)}
    for method in methods:
        per_seed = []
        for seed in seeds:
            run_dir = out / "runs" / f"{method.name.split(' (')[0].replace(' ', '_')}_{method.procs}p_s{seed}"
            cmd = _command(method, run_dir, seed, epochs, extra)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "WANDB_MODE": "offline"})
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"study run {method.name} seed {seed} failed (exit {proc.returncode}): "
                                   f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
            curve = _read_curve(run_dir)
            per_seed.append({"seed": seed, "wall_s": wall, "curve": curve, "final_val_acc": curve[-1]["val_acc"]})
            print(f"  {method.name:24s} seed {seed}: val acc {curve[-1]['val_acc']:.4f}  ({wall:.0f} s)", flush=True)
        accs = [r["final_val_acc"] for r in per_seed]
        results["methods"][method.name] = {
            "procs": method.procs, "overrides": list(method.overrides), "runs": per_seed,
            "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "wall_s_mean": statistics.mean(r["wall_s"] for r in per_seed),
        }
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, m in results["methods"].items():
        curves = [r["curve"] for r in m["runs"]]
        n = min(len(c) for c in curves)
        epochs = [c["epoch"] + 1 for c in curves[0][:n]]
        mean = [statistics.mean(c[i]["val_acc"] for c in curves) for i in range(n)]
        style = "--" if m["procs"] == 1 else "-"
        ax.plot(epochs, mean, style, marker="o", label=name)
    ax.set_xlabel("epoch (same samples seen by every method)")
    ax.set_ylabel("validation accuracy (mean over seeds)")
    ax.set_title("digits, ResNet-18: per-device batch 2 on 2 CPU ranks vs single-process references")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1 epoch of 20 batches, 2 methods (SyncBN 2x2, BN batch 4)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<date>/study)")
    p.add_argument("--wandb", action="store_true", help="also log the table and plot to W&B (offline by default)")
    args = p.parse_args(argv)
    out = args.out or default_out() / "study"
    methods = [m for m in METHODS if not args.quick or m.name in QUICK]
    seeds = [0] if args.quick else list(range(args.seeds))
    epochs = 1 if args.quick else args.epochs
    extra = ["trainer.limit_train_batches=20", "trainer.limit_val_batches=5"] if args.quick else []
    t0 = time.perf_counter()
    results = run_study(methods, seeds, epochs, out, extra)
    results["machine"] = machine_info(2, "gloo")
    results["wall_s"] = time.perf_counter() - t0
    plot(results, out / "accuracy.png")
    header = ["method", "procs x batch", "final val acc (mean +- std)", "wall s (mean)"]
    rows = []
    for name, m in results["methods"].items():
        batch = next((o.split("=")[1] for o in m["overrides"] if o.startswith("data.batch_size=")), "2")
        rows.append([name, f"{m['procs']} x {batch}", f"{m['acc_mean']:.4f} +- {m['acc_std']:.4f}",
                     f"{m['wall_s_mean']:.0f}"])
    notes = [f"{len(seeds)} seed(s), {epochs} epoch(s) per run; total wall time {results['wall_s']:.0f} s",
             "SyncBN (2x2) and BN batch 4 (1 proc) see the same batches in the same order: their curves coincide "
             "up to floating-point differences (different kernels) that a thousand steps amplify"]
    print_table("small-batch study (digits, ResNet-18)", header, rows, notes)
    md = "\n".join(["# Small-batch study", "", *machine_lines(results["machine"]), "",
                    markdown_table(header, rows), "", *notes, "", "![accuracy](accuracy.png)"]) + "\n"
    write_results(results, md, out)
    if args.wandb:
        import wandb

        run = wandb.init(project="syncnorm", job_type="small_batch_study", dir=str(out),
                         mode=os.environ.get("WANDB_MODE", "offline"))
        run.log({"study/table": wandb.Table(columns=header, data=rows),
                 "study/accuracy": wandb.Image(str(out / "accuracy.png"))})
        run.finish()
    print(f"results: {out}/results.md, plot: {out}/accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
