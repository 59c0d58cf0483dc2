"""Training-step time of a DDP ResNet-18 or ResNet-50 with four norm variants, on gloo (CPU).

Run with torchrun (one process per rank)::

    torchrun --nproc_per_node=2 -m syncnorm.bench.step [--model resnet18|resnet50] [--steps 40] \\
        [--batch 16] [--image 32] [--width 64] [--quick] [--out DIR]

ResNet-50 (``--model resnet50``) keeps the standard channel layout (width 64: 53 batch-norm layers,
26,560 channels, so the collectives have their real sizes) with small images and batches (default
8 images of 16x16 per rank, small stem) so that one step takes about a second on a CPU rank.

Variants (see :mod:`syncnorm.bench.variants`): ``local`` BatchNorm2d, ``floor`` (BatchNorm2d plus
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

from . import common, report
from ._resnet import MODELS, bn_layers, build_model
from .variants import VARIANTS, build_variant, count_collectives, expected_comm

GOAL_SYNC_OVER_FLOOR = 1.10
LOSS_TOLERANCE = 1e-4
NUM_CLASSES = 10
NUM_BATCHES = 4  # distinct fixed batches per rank, cycled
MODEL_DEFAULTS = {"resnet18": (16, 32), "resnet50": (8, 16)}
"""(batch per rank, image side) per model: one ResNet-50 step stays around a second on 2 CPU ranks."""
CHECK_STEPS = 2  # parity check: step 1 compares forwards, step 2 also the first update (backward)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=2 -m syncnorm.bench.step",
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
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 40)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    batch, image = MODEL_DEFAULTS[args.model]
    args.batch = args.batch if args.batch is not None else (max(2, batch // 2) if args.quick else batch)
    args.image = args.image if args.image is not None else image
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


def _time_interleaved(runners: dict[str, _Runner], steps: int, block: int) -> dict[str, list[float]]:
    """Per-step wall times (s) of each variant on this rank, variants taking turns in blocks."""
    times: dict[str, list[float]] = {v: [] for v in runners}
    names = list(runners)
    r = 0
    while any(len(t) < steps for t in times.values()):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            for _ in range(min(block, steps - len(times[v]))):
                t0 = time.perf_counter()
                runners[v].step()
                times[v].append(time.perf_counter() - t0)
        r += 1
    return times


def _max_over_ranks(values: Sequence[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


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
    diff, pdiff = _max_over_ranks([diff, pdiff])
    return {
        "loss_syncnorm": mean_losses["syncnorm"], "loss_naive": mean_losses["naive"],
        "max_abs_loss_diff": diff, "max_abs_param_diff": pdiff, "tolerance": LOSS_TOLERANCE,
        "steps": CHECK_STEPS, "passed": bool(diff <= LOSS_TOLERANCE),
    }


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
    runners = {v: _Runner(base, v, args.lr, data) for v in VARIANTS}

    for v in VARIANTS:
        for _ in range(args.warmup):
            runners[v].step()
    times = _time_interleaved(runners, args.steps, args.block)
    flat = _max_over_ranks([t for v in VARIANTS for t in times[v]])
    times = {v: flat[i * args.steps:(i + 1) * args.steps] for i, v in enumerate(VARIANTS)}

    counted = {v: _count_step(runners[v]) for v in VARIANTS}
    counted_max = _max_over_ranks([x for v in VARIANTS for x in (counted[v]["collectives"], counted[v]["bytes"])])
    del runners
    correctness = _parity_check(base, args, data)

    variants: dict[str, Any] = {}
    for i, v in enumerate(VARIANTS):
        entry: dict[str, Any] = report.summarize(times[v])
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
    sync_floor = variants["syncnorm"]["median_ms"] / variants["floor"]["median_ms"]
    layers = bn_layers(base)
    return {
        "benchmark": "syncnorm.bench.step",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "torchrun --nproc_per_node={} -m syncnorm.bench.step {}".format(world, " ".join(sys.argv[1:])),
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
            "syncnorm_over_floor_paired": report.paired_ratio(times["syncnorm"], times["floor"], args.block),
            "syncnorm_over_naive": variants["syncnorm"]["median_ms"] / variants["naive"]["median_ms"],
            "syncnorm_over_naive_paired": report.paired_ratio(times["syncnorm"], times["naive"], args.block),
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("syncnorm.bench.step: expected to be started by torchrun, e.g. "
              "`torchrun --nproc_per_node=2 -m syncnorm.bench.step`", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    try:
        if dist.get_world_size() < 2:
            raise RuntimeError(f"syncnorm.bench.step: expected a world size >= 2, got {dist.get_world_size()}")
        results = run(args)
        if dist.get_rank() == 0:
            out = args.out or Path("benchmarks/results") / f"step_{datetime.datetime.now():%Y%m%d-%H%M%S}"
            report.print_table(results)
            js, md = report.write_results(results, out)
            print(f"wrote {js} and {md}", flush=True)
        dist.barrier()
    finally:
        # a live gloo group at interpreter exit can abort the process: tear it down explicitly
        dist.destroy_process_group()
    return 0 if results["correctness"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
