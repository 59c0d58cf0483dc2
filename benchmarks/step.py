"""Training-step time of a DDP ResNet-18 or ResNet-50 with four norm variants, on gloo (CPU).

Run with torchrun (one process per rank)::

    torchrun --nproc_per_node=2 -m benchmarks.step [--model resnet18|resnet50] [--steps 40] \\
        [--batch 16] [--image 32] [--width 64] [--quick] [--out DIR]

ResNet-50 (``--model resnet50``) keeps the standard channel layout (width 64: 53 batch-norm layers,
26,560 channels, so the collectives have their real sizes) with small images and batches (default
8 images of 16x16 per rank, small stem) so that one step takes about a second on a CPU rank.

Variants (see :mod:`benchmarks.variants`): ``local`` BatchNorm2d, ``floor`` (BatchNorm2d plus
syncnorm's collectives carrying zeros: the communication no synchronized BN avoids), ``syncnorm``
and ``naive`` (autograd through a differentiable all_reduce). All start from the same weights, are
wrapped in ``DistributedDataParallel`` and trained with SGD and cross-entropy on fixed random data
(different per rank).

Method: after warm-up, the variants take turns in blocks of ``--block`` steps (the first variant of
a round rotates), so slow phases of a shared machine hit all of them. Each full step (zero_grad,
forward, loss, backward, optimizer step) is timed with ``time.perf_counter`` on each rank with no
barrier; the per-step times are combined across ranks with an ``all_reduce(MAX)`` once, after the
timing. Then one counted step per variant checks the number of collectives against the analytic
count, and a parity check runs ``syncnorm`` and ``naive`` from the same initial weights on the same
batches: their losses must agree within ``1e-4``, else the run exits with status 1 (a benchmark of a
wrong implementation is worthless).

Writes ``results.json`` and ``results.md`` into ``--out`` (default
``benchmarks/results/step_<date>``) and prints a table on rank 0.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import common
from ._resnet import MODELS, bn_layers, build_model
from .variants import VARIANTS, build_variant, count_collectives, expected_comm

GOAL_SYNC_OVER_FLOOR = 1.05
LOSS_TOLERANCE = 1e-4
NUM_CLASSES = 10
NUM_BATCHES = 4  # distinct fixed batches per rank, cycled
COLUMNS = (
    "median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "mean_ms", "n_steps", "ratio_to_local",
    "collectives_per_step", "bytes_per_step", "counted_collectives_per_step", "counted_bytes_per_step",
)
"""Keys of every variant's entry in ``results.json``."""


MODEL_DEFAULTS = {"resnet18": (16, 32), "resnet50": (8, 16)}
"""(batch per rank, image side) per model: one ResNet-50 step stays around a second on 2 CPU ranks."""
CHECK_STEPS = 2  # parity check: step 1 compares forwards, step 2 also the first update (backward)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=2 -m benchmarks.step",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=list(MODELS), help="network (default: resnet18)")
    p.add_argument("--width", type=int, default=64,
                   help="first-stage channels (default: 64, the standard layout: ResNet-50 53 BN layers with "
                        "26,560 channels, ResNet-18 20 with 4,800)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 40; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default: 3; --quick: 1)")
    p.add_argument("--block", type=int, default=5, help="consecutive steps of one variant per turn (default: 5)")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per rank (default: resnet18 16, resnet50 8; --quick: half)")
    p.add_argument("--image", type=int, default=None,
                   help="image side in pixels (default: resnet18 32, resnet50 16)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    p.add_argument("--quick", action="store_true", help="few steps, for a smoke test")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: benchmarks/results/step_<date>)")
    args = p.parse_args(argv)
    batch, image = MODEL_DEFAULTS[args.model]
    common.fill_defaults(args, steps=(40, 2), warmup=(3, 1), batch=(batch, max(2, batch // 2)), image=(image, image))
    for name in ("steps", "block", "batch", "image", "width"):
        if getattr(args, name) < 1:
            p.error(f"expected --{name} >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"expected --warmup >= 0, got {args.warmup}")
    return args


def _make_data(args: argparse.Namespace, rank: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(args.seed * 1000 + 17 + rank)
    return [
        (torch.randn(args.batch, 3, args.image, args.image, generator=g),
         torch.randint(0, NUM_CLASSES, (args.batch,), generator=g))
        for _ in range(NUM_BATCHES)
    ]


class _Runner:
    """One variant: the DDP-wrapped model, its optimizer and its position in the data cycle."""

    def __init__(self, base: nn.Module, variant: str, lr: float, data: list[tuple[Tensor, Tensor]]) -> None:
        self.model = DistributedDataParallel(build_variant(base, variant))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        self.data, self.i = data, 0

    def step(self) -> Tensor:
        x, y = self.data[self.i % len(self.data)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.detach()


def _count_step(runner: _Runner) -> dict[str, int]:
    with count_collectives() as log:
        runner.step()
    return {"collectives": len(log), "bytes": sum(size for _, size in log)}


def _parity_check(base: nn.Module, args: argparse.Namespace, data: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """``syncnorm`` and ``naive`` from the same initial weights and batches: same losses?"""
    runs = {v: _Runner(base, v, args.lr, data) for v in ("syncnorm", "naive")}
    losses = {v: [float(r.step()) for _ in range(CHECK_STEPS)] for v, r in runs.items()}
    diff = max(abs(a - b) for a, b in zip(losses["syncnorm"], losses["naive"]))
    params = zip(runs["syncnorm"].model.module.parameters(), runs["naive"].model.module.parameters())
    pdiff = max(float((a.detach() - b.detach()).abs().max()) for a, b in params)
    world = dist.get_world_size()
    mean_losses = {}
    for v, ls in losses.items():
        t = torch.tensor(ls, dtype=torch.float64)
        dist.all_reduce(t)
        mean_losses[v] = [round(x / world, 6) for x in t.tolist()]
    diff, pdiff = common.max_over_ranks([diff, pdiff])
    return {
        "loss_syncnorm": mean_losses["syncnorm"], "loss_naive": mean_losses["naive"],
        "max_abs_loss_diff": diff, "max_abs_param_diff": pdiff, "tolerance": LOSS_TOLERANCE,
        "steps": CHECK_STEPS, "passed": bool(diff <= LOSS_TOLERANCE),
    }


def _measure(args: argparse.Namespace, base: nn.Module, data: list[tuple[Tensor, Tensor]]
             ) -> tuple[dict[str, list[float]], list[float]]:
    """Per-step times of every variant (max over ranks) and the counted collectives of one step."""
    runners = {v: _Runner(base, v, args.lr, data) for v in VARIANTS}
    for v in VARIANTS:
        for _ in range(args.warmup):
            runners[v].step()
    times = common.time_interleaved({v: r.step for v, r in runners.items()}, args.steps, args.block)
    flat = common.max_over_ranks([t for v in VARIANTS for t in times[v]])
    times = {v: flat[i * args.steps:(i + 1) * args.steps] for i, v in enumerate(VARIANTS)}
    counted = {v: _count_step(runners[v]) for v in VARIANTS}
    counted_max = common.max_over_ranks([x for v in VARIANTS for x in (counted[v]["collectives"], counted[v]["bytes"])])
    return times, counted_max


def _variants(base: nn.Module, times: dict[str, list[float]], counted_max: list[float]) -> dict[str, Any]:
    """Each variant's time statistics, ratio to ``local``, expected and counted collectives."""
    variants: dict[str, Any] = {}
    for i, v in enumerate(VARIANTS):
        entry: dict[str, Any] = common.summarize_ms(times[v])
        exp = expected_comm(base, v)
        entry.update({
            "collectives_per_step": exp["collectives"], "bytes_per_step": exp["bytes"],
            "counted_collectives_per_step": int(counted_max[2 * i]),
            "counted_bytes_per_step": int(counted_max[2 * i + 1]),
            "times_ms": [round(t * 1e3, 3) for t in times[v]],
        })
        variants[v] = entry
    local = variants["local"]["median_ms"]
    for entry in variants.values():
        entry["ratio_to_local"] = entry["median_ms"] / local
    return variants


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark on the initialized process group; returns the results (same on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    wall0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    machine = common.machine_info(world, dist.get_backend())  # load average at the start
    torch.manual_seed(args.seed)
    base, model_source = build_model(args.model, NUM_CLASSES, args.width)
    base.train()
    data = _make_data(args, rank)
    times, counted_max = _measure(args, base, data)
    correctness = _parity_check(base, args, data)
    variants = _variants(base, times, counted_max)
    sync_floor = variants["syncnorm"]["median_ms"] / variants["floor"]["median_ms"]
    layers = bn_layers(base)
    return {
        "benchmark": "benchmarks.step",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "torchrun --nproc_per_node={} -m benchmarks.step {}".format(world, " ".join(sys.argv[1:])),
        "config": {
            "model": args.model, "model_source": model_source, "width": args.width, "batch": args.batch,
            "image": args.image,
            "steps": args.steps, "warmup": args.warmup, "block": args.block, "lr": args.lr,
            "seed": args.seed, "quick": args.quick, "optimizer": "SGD(momentum=0.9)",
            "bn_layers": len(layers), "bn_channels": sum(m.num_features for _, m in layers),
        },
        "machine": machine,
        "variants": variants,
        "ratios": {
            "syncnorm_over_floor": sync_floor, "goal_syncnorm_over_floor": GOAL_SYNC_OVER_FLOOR,
            "syncnorm_over_floor_ok": bool(sync_floor <= GOAL_SYNC_OVER_FLOOR),
            "syncnorm_over_floor_paired": common.paired_ratio(times["syncnorm"], times["floor"], args.block),
            "syncnorm_over_naive": variants["syncnorm"]["median_ms"] / variants["naive"]["median_ms"],
            "syncnorm_over_naive_paired": common.paired_ratio(times["syncnorm"], times["naive"], args.block),
            "floor_over_local": variants["floor"]["ratio_to_local"],
        },
        "correctness": correctness,
        "timing": {
            "method": "per-step time.perf_counter around zero_grad+forward+backward+SGD step, no barrier; "
                      "max over ranks per step (all_reduce MAX after timing); variants interleaved in "
                      "blocks, rotating start; median and IQR (inclusive quartiles) over steps",
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0],
            "wall_s": time.perf_counter() - wall0,
        },
    }


def _rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, v in results["variants"].items():
        counted = v["counted_collectives_per_step"]
        match = "" if counted == v["collectives_per_step"] and v["counted_bytes_per_step"] == v["bytes_per_step"] else " (!)"
        rows.append([
            name, f"{v['median_ms']:.1f}", f"{v['iqr_ms']:.1f}", f"{v['min_ms']:.1f}", f"{v['ratio_to_local']:.3f}",
            str(v["collectives_per_step"]), common.fmt_bytes(v["bytes_per_step"]), f"{counted}{match}",
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


def markdown(results: dict[str, Any]) -> str:
    m, cfg, t = results["machine"], results["config"], results["timing"]
    return "\n".join([
        f"# Step-time benchmark: {cfg['model']}, {m['world_size']} ranks on {m['backend']}",
        "",
        f"- date: {results['date']}",
        *common.machine_lines(m),
        f"- model: {cfg['model_source']}; {cfg['bn_layers']} BN layers, {cfg['bn_channels']} channels",
        f"- batch {cfg['batch']} per rank, {cfg['image']}x{cfg['image']} images, {cfg['warmup']} warm-up "
        f"steps per variant, {cfg['steps']} timed steps per variant in blocks of {cfg['block']} "
        f"(round-robin, rotating start)",
        f"- load average (1 min) before/after: {t['loadavg_before']:.2f} / {t['loadavg_after']:.2f}; "
        f"wall time {t['wall_s']:.1f} s",
        f"- command: `{results['command']}`",
        "",
        common.markdown_table(_HEADER, _rows(results)),
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


def report(results: dict[str, Any], out: Optional[Path]) -> None:
    """Rank 0: print the table, write ``results.json`` and ``results.md``."""
    cfg = results["config"]
    title = (f"step time, {cfg['model']} batch {cfg['batch']}/rank {cfg['image']}x{cfg['image']}, "
             f"{results['machine']['world_size']} ranks {results['machine']['backend']}, "
             f"{cfg['steps']} steps/variant")
    common.print_table(title, _HEADER, _rows(results), _summary_lines(results))
    out = out or Path("benchmarks/results") / f"step_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    js, md = common.write_results(results, markdown(results), out)
    print(f"wrote {js} and {md}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    results = common.run_under_torchrun("benchmarks.step", lambda: run(args), lambda r: report(r, args.out))
    if results is None:
        return 2
    return 0 if results["correctness"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
