"""Training-step time on one GPU: local BatchNorm, ``torch.nn.SyncBatchNorm`` and syncnorm.

Run from the repository root::

    python -m benchmarks.gpu [--model resnet50] [--batch 32] [--image 64] [--steps 30] [--quick]
                             [--device cuda] [--out DIR]

Both synchronized layers run their real synchronized code path in one process, through the
one-process scaled group of 2 ranks (``tests/helpers/scaled_pg.py``: its all_reduce and
all_gather are in-place device kernels, as if a second rank held the same batch). What is measured
is therefore each layer's own cost on the device, kernels and launches, without the network:
exactly what syncnorm can change. The three variants start from the same weights, train on the
same batches (SGD), and take turns in blocks of steps after a warm-up; each step is timed with
CUDA events. Before timing, the first steps of syncnorm and torch's SyncBatchNorm must give the
same losses (1e-3), else exit status 1.

``--device cpu`` runs the same code on the CPU without the torch variant (which refuses CPU
input): the smoke test of this file.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import (default_out, now_iso, machine_info, machine_lines, markdown_table, paired_ratio, print_table,
                     summarize_ms, write_results)

BLOCK = 5
LOSS_TOLERANCE = 1e-3


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"], help="network (default resnet50)")
    p.add_argument("--batch", type=int, default=32, help="samples per step (default 32)")
    p.add_argument("--image", type=int, default=64, help="image side (default 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 30; --quick 2)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    p.add_argument("--quick", action="store_true", help="a few small steps")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<date>/gpu)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.quick else 30
    if args.quick:
        args.batch, args.image = min(args.batch, 4), min(args.image, 16)
    return args


def _base(args: argparse.Namespace) -> nn.Module:
    from syncnorm.app.models.resnet import build_resnet

    torch.manual_seed(0)
    depth = 50 if args.model == "resnet50" else 18
    width = 16 if args.quick else 64
    return build_resnet(depth, num_classes=10, in_channels=3, stem="small", width=width)


def _variants(base: nn.Module, device: str) -> dict[str, nn.Module]:
    import syncnorm

    variants = {"local": copy.deepcopy(base), "syncnorm": syncnorm.convert_norms(copy.deepcopy(base), "sync")}
    if device != "cpu":
        variants["torch_syncbn"] = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
    return {k: v.to(device) for k, v in variants.items()}


def _stepper(model: nn.Module, batches: list) -> Callable[[], torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = {"i": 0}

    def step() -> torch.Tensor:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _timed(step: Callable[[], Any], device: str) -> float:
    """Seconds of one step: CUDA events on the GPU, wall time on the CPU."""
    if device == "cpu":
        import time

        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.helpers.scaled_pg import scaled_group

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, args.image, args.image, generator=g).to(args.device),
                torch.randint(0, 10, (args.batch,), generator=g).to(args.device)) for _ in range(4)]
    with scaled_group(2):
        models = _variants(_base(args), args.device)
        steps = {k: _stepper(m, batches) for k, m in models.items()}
        first = {k: [float(steps[k]()) for _ in range(2)] for k in steps}  # warm-up and parity
        if "torch_syncbn" in first:
            gap = max(abs(a - b) for a, b in zip(first["syncnorm"], first["torch_syncbn"]))
            if gap > LOSS_TOLERANCE:
                raise SystemExit(f"benchmarks.gpu: syncnorm and torch SyncBatchNorm losses differ by {gap:.3g}")
        times: dict[str, list[float]] = {k: [] for k in steps}
        names, r = list(steps), 0
        while any(len(t) < args.steps for t in times.values()):
            for k in names[r % len(names):] + names[:r % len(names)]:
                for _ in range(min(BLOCK, args.steps - len(times[k]))):
                    times[k].append(_timed(steps[k], args.device))
            r += 1
    summary = {k: summarize_ms(v) for k, v in times.items()}
    ratios = {k: paired_ratio(v, times["local"], BLOCK) for k, v in times.items() if k != "local"}
    if "torch_syncbn" in times:
        ratios["syncnorm/torch_syncbn"] = paired_ratio(times["syncnorm"], times["torch_syncbn"], BLOCK)
    device_name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    return {"args": vars(args) | {"out": str(args.out)}, "machine": machine_info(1, "scaledw") | {"device": device_name},
            "first_losses": first, "summary": summary, "paired_ratios": ratios, "times_s": times}


def report(res: dict[str, Any], out: Path) -> None:
    rows = [[k, f"{s['median_ms']:.2f}", f"{s['iqr_ms']:.2f}",
             f"{res['paired_ratios'][k]['median']:.3f}" if k in res["paired_ratios"] else "1"]
            for k, s in res["summary"].items()]
    header = ["variant", "median ms/step", "IQR ms", "paired ratio to local"]
    notes = [f"syncnorm / torch SyncBatchNorm (paired): {res['paired_ratios']['syncnorm/torch_syncbn']['median']:.3f}"
             ] if "syncnorm/torch_syncbn" in res["paired_ratios"] else []
    a = res["args"]
    title = f"{a['model']}, batch {a['batch']}, {a['image']}x{a['image']}, {res['machine']['device']}"
    print_table(title, header, rows, notes)
    md = "\n".join([f"# GPU train step: {title}", "", *machine_lines(res["machine"]),
                    f"- date: {now_iso()}", "", markdown_table(header, rows), "", *notes, ""])
    write_results(res, md, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.out = args.out or default_out() / "gpu"
    if args.device != "cpu" and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device; use --device cpu for the smoke test", file=sys.stderr)
        return 2
    report(run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
