"""Training-step time of a SyncBatchNorm CNN, eager vs ``torch.compile(fullgraph=True)``, 2 ranks.

Run with torchrun (one process per rank)::

    torchrun --standalone --nproc_per_node=2 -m benchmarks.compiled [--steps 30] [--quick] [--out DIR]

A small ResNet-18 (width 16, 16x16 inputs, batch 8 per rank) with every norm converted to
``SyncBatchNorm``; gradients averaged over the ranks by hand (what DDP does), SGD. The compiled copy
starts from the same weights; both run the same batches, interleaved in blocks, after warm-up (the
compile itself is reported separately). Before timing, the first steps of both must give the same
losses within 1e-4, and ``torch._dynamo.explain`` must report 0 graph breaks; else exit status 1.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .common import (default_out, machine_info, machine_lines, markdown_table, max_over_ranks, print_table,
                     run_under_torchrun, summarize_ms, time_interleaved, write_results)


def _model() -> nn.Module:
    import syncnorm
    from syncnorm.app.models.resnet import build_resnet

    torch.manual_seed(0)
    return syncnorm.convert_norms(build_resnet(18, num_classes=10, in_channels=3, stem="small", width=16), "sync")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=2 -m benchmarks.compiled",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (default 30; --quick: 4)")
    p.add_argument("--batch", type=int, default=8, help="per-rank batch (default 8)")
    p.add_argument("--quick", action="store_true", help="a few steps, for the smoke test")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<date>/compiled)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Eager and compiled copies of the model, the same batches: parity, timing, graph breaks."""
    steps = 4 if args.quick else args.steps
    rank, world = dist.get_rank(), dist.get_world_size()
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    t0 = time.perf_counter()
    compiled = torch.compile(compiled_model, fullgraph=True)
    g = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(args.batch, 3, 16, 16, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
               for _ in range(4)]
    opts = {"eager": torch.optim.SGD(eager.parameters(), lr=0.05),
            "compiled": torch.optim.SGD(compiled_model.parameters(), lr=0.05)}
    nets = {"eager": (eager, eager), "compiled": (compiled, compiled_model)}
    it = {"eager": 0, "compiled": 0}

    def step(name: str) -> float:
        fn, params = nets[name]
        x, y = batches[it[name] % len(batches)]
        it[name] += 1
        loss = nn.functional.cross_entropy(fn(x), y)
        opts[name].zero_grad()
        loss.backward()
        for prm in params.parameters():  # DDP's gradient averaging
            dist.all_reduce(prm.grad)
            prm.grad /= world
        opts[name].step()
        return loss.item()

    losses = {k: [step(k) for _ in range(2)] for k in ("eager", "compiled")}  # includes the compile
    compile_s = max_over_ranks([time.perf_counter() - t0])[0]
    diff = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"]))
    times = time_interleaved({k: (lambda k=k: step(k)) for k in ("eager", "compiled")}, steps, block=5)
    stats = {k: summarize_ms(max_over_ranks(v)) for k, v in times.items()}
    # explain() resets dynamo's caches: only after the timing
    breaks = torch._dynamo.explain(copy.deepcopy(eager))(batches[0][0]).graph_break_count
    return {"machine": machine_info(world, "gloo"), "stats": stats, "loss_diff": diff, "graph_breaks": breaks,
            "compile_s": compile_s, "passed": diff <= 1e-4 and breaks == 0, "steps": steps, "batch": args.batch}


def report(results: dict[str, Any], out: Optional[Path]) -> None:
    """Rank 0: print the table, write ``results.json`` and ``results.md``."""
    stats, world = results["stats"], results["machine"]["world_size"]
    base = stats["eager"]["median_ms"]
    rows = [[k, f"{s['median_ms']:.1f}", f"{s['iqr_ms']:.1f}", f"{s['median_ms'] / base:.3f}"] for k, s in stats.items()]
    header = ["variant", "median ms", "IQR ms", "x eager"]
    notes = [f"first two steps' losses: max |eager - compiled| = {results['loss_diff']:.2e} (tolerance 1e-4); "
             f"graph breaks: {results['graph_breaks']}; compile + 2 steps: {results['compile_s']:.1f} s; "
             f"{'PASSED' if results['passed'] else 'FAILED'}"]
    print_table(f"SyncBatchNorm ResNet-18 (width 16) train step, {world} ranks gloo, eager vs compiled", header, rows,
                notes)
    md = "\n".join(["# Eager vs torch.compile(fullgraph=True), SyncBatchNorm ResNet-18 (width 16)", "",
                    *machine_lines(results["machine"]), "", markdown_table(header, rows), "", *notes]) + "\n"
    write_results(results, md, out or default_out() / "compiled")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    results = run_under_torchrun("benchmarks.compiled", lambda: run(args), lambda r: report(r, args.out), min_world=1)
    if results is None:
        return 2
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
