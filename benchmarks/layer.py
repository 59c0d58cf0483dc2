"""Per-layer forward+backward time of synchronized batch norms, against local ``BatchNorm2d``.

Run with torchrun (2 ranks for the synchronized variants; the W=1 part runs inside the same job)::

    torchrun --nproc_per_node=2 -m benchmarks.layer [--quick] [--out DIR]

For every configuration (N, C, HxW) one iteration is ``y = layer(x); y.backward(dy)`` on a fixed
input. Two parts:

* ``w2``: every rank of the job runs every variant at the same time (both busy, one thread each):
  ``local`` BatchNorm2d, ``syncnorm_nopeer`` (syncnorm's synchronized code path,
  :class:`syncnorm.engine`'s synchronized Function, with no group: the same math, no
  communication), ``floor`` (BatchNorm2d plus syncnorm's two collectives carrying zeros),
  ``syncnorm`` (:class:`syncnorm.SyncBatchNorm` over the W ranks), ``naive_allgather`` (per-rank
  mean, variance and count gathered with the differentiable
  ``torch.distributed.nn.functional.all_gather``, merged, autograd through it) and ``torch_syncbn``
  (``torch.nn.SyncBatchNorm``; refuses CPU tensors, recorded as n/a with its error).
* ``w1``: rank 0 alone (the other ranks wait in a barrier) on a one-rank subgroup: ``local``,
  ``syncnorm_nopeer``, ``syncnorm_fn_1rank`` (the synchronized Function with that one-rank group:
  its all_reduce calls run, with no peer), ``syncnorm_layer_1rank`` (the layer on that group,
  which takes its local BatchNorm path), ``naive_allgather`` and ``torch_syncbn`` on that group.

Ratios are of medians against ``local`` of the same part. Per-iteration times are combined across
ranks with an element-wise max (``w2``). Before timing, each configuration checks that syncnorm's
outputs and input gradients match the naive reference (``w2``) and local BatchNorm (``nopeer``).

Writes ``results.json`` and ``results.md`` into ``--out`` (default
``benchmarks/results/<date>/layer``) and prints the tables on rank 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

import syncnorm
from syncnorm import engine

from . import common
from .variants import FloorBatchNorm2d, count_collectives

W2_VARIANTS = ("local", "syncnorm_nopeer", "floor", "syncnorm", "naive_allgather", "torch_syncbn")
W1_VARIANTS = ("local", "syncnorm_nopeer", "syncnorm_fn_1rank", "syncnorm_layer_1rank", "naive_allgather",
               "torch_syncbn")
DESCRIPTIONS = {
    "local": "torch.nn.BatchNorm2d, per-rank statistics (baseline of the ratios)",
    "syncnorm_nopeer": "the engine's synchronized Function without a group: the "
                       "synchronized code path (fp64 merged moments, explicit backward), no communication",
    "syncnorm_fn_1rank": "the engine's Function over a one-rank gloo group: its two all_reduce calls run, no peer",
    "syncnorm_layer_1rank": "syncnorm.SyncBatchNorm(process_group=<one-rank group>): takes the local BatchNorm path",
    "floor": "BatchNorm2d + syncnorm's collectives carrying zeros (fwd all_reduce (2C+11) fp64, bwd 2C fp32)",
    "syncnorm": "syncnorm.SyncBatchNorm over all ranks",
    "naive_allgather": "per-rank (mean, var, count) -> differentiable torch.distributed.nn.functional.all_gather "
                       "-> count-weighted merge, autograd through it (backward: W scatters on gloo)",
    "torch_syncbn": "torch.nn.SyncBatchNorm (GPU only)",
}
CHANNELS = (64, 256, 1024)
SPATIAL = (8, 32)
BATCH = 8
TOL = 1e-4


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=2 -m benchmarks.layer",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS), help="C values (default: 64 256 1024)")
    p.add_argument("--spatial", type=int, nargs="+", default=list(SPATIAL), help="H=W values (default: 8 32)")
    p.add_argument("--batch", type=int, default=BATCH, help="N per rank (default: 8)")
    p.add_argument("--reps", type=int, default=None, help="timed iterations per variant (default: 30; --quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per variant (default: 3; --quick: 1)")
    p.add_argument("--block", type=int, default=None, help="consecutive iterations per turn (default: 5; --quick: 3)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (gloo) or cuda (nccl, one GPU per rank) (default: cpu)")
    p.add_argument("--no-w1", action="store_true", help="skip the W=1 part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="few iterations, for a smoke test")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results/<date>/layer)")
    args = p.parse_args(argv)
    common.fill_defaults(args, reps=(30, 3), warmup=(3, 1), block=(5, 3))
    for name in ("reps", "block", "batch"):
        if getattr(args, name) < 1:
            p.error(f"expected --{name} >= 1, got {getattr(args, name)}")
    if min(args.channels) < 1 or min(args.spatial) < 1:
        p.error("expected positive --channels and --spatial")
    return args


# --------------------------------------------------------------------------------------- variants


def syncnorm_function(bn: "syncnorm.SyncBatchNorm", group: Any) -> Callable[[Tensor], Tensor]:
    """``x -> `` the engine's synchronized Function with ``bn``'s parameters and buffers over
    ``group`` (``None``: the same math, no communication)."""

    def fwd(x: Tensor) -> Tensor:
        call = engine._prepare(bn, x, group, None)
        return engine._SyncBatchNormFunction.apply(x, bn.weight, bn.bias, call)

    return fwd


def naive_allgather_bn(x: Tensor, bn: nn.BatchNorm2d, group: Any) -> Tensor:
    """Synchronized BN by autograd through ``torch.distributed.nn.functional.all_gather``.

    Each rank gathers every rank's ``[mean (C), biased var (C), count]`` (float32, ``2C + 1``),
    merges them count-weighted (``var = sum n_i (var_i + (mean_i - mean)^2) / n``), and normalizes;
    the backward is autograd's through the merge and the collective.
    """
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    xf = x.float()
    n = float(x.numel() // c)
    mean = xf.mean(dims)
    var = xf.var(dims, unbiased=False)
    vec = torch.cat([mean, var, torch.full((1,), n, dtype=torch.float32, device=x.device)])
    with warnings.catch_warnings():  # deprecated in favour of functional collectives; the point here
        warnings.simplefilter("ignore")
        parts = dist_nn.all_gather(vec, group=group)
    allv = torch.stack(parts)  # (W, 2C + 1)
    counts = allv[:, 2 * c:].detach()  # (W, 1)
    total = counts.sum()
    means, vars_ = allv[:, :c], allv[:, c:2 * c]
    gmean = (counts * means).sum(0) / total
    gvar = (counts * (vars_ + (means - gmean) ** 2)).sum(0) / total
    with torch.no_grad():
        f = bn.momentum if bn.momentum is not None else 0.1
        bn.running_mean.lerp_(gmean.detach(), f)
        bn.running_var.lerp_(gvar.detach() * total / (total - 1), f)
    invstd = torch.rsqrt(gvar + bn.eps)
    scale = bn.weight * invstd
    shift = bn.bias - gmean * scale
    shape = [1, c] + [1] * (x.dim() - 2)
    return (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)


def build_forward(variant: str, c: int, device: torch.device, group: Any) -> tuple[Callable[[Tensor], Tensor], nn.Module]:
    """``(forward, module)`` of ``variant`` for ``c`` channels; ``group`` is the part's group."""
    if variant == "local":
        m = nn.BatchNorm2d(c)
        fwd: Callable[[Tensor], Tensor] = m
    elif variant == "floor":
        m = FloorBatchNorm2d(c)
        fwd = m
    elif variant in ("syncnorm", "syncnorm_layer_1rank"):
        m = syncnorm.SyncBatchNorm(c, process_group=group)
        fwd = m
    elif variant in ("syncnorm_nopeer", "syncnorm_fn_1rank"):
        m = syncnorm.SyncBatchNorm(c)
        fwd = syncnorm_function(m, None if variant == "syncnorm_nopeer" else group)
    elif variant == "naive_allgather":
        m = nn.BatchNorm2d(c)
        fwd = lambda x, m=m: naive_allgather_bn(x, m, group)  # noqa: E731
    elif variant == "torch_syncbn":
        m = nn.SyncBatchNorm(c, process_group=group)
        fwd = m
    else:
        raise ValueError(f"benchmarks.layer: unknown variant {variant!r}")
    m.to(device).train()
    with torch.no_grad():  # non-trivial affine parameters, the same for every variant
        g = torch.Generator().manual_seed(c)
        m.weight.copy_(1.0 + 0.1 * torch.randn(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return fwd, m


class _Iteration:
    """One timed unit: ``y = fwd(x); y.backward(dy)`` with gradients reset (set to None) first."""

    def __init__(self, fwd: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor, dy: Tensor) -> None:
        self.fwd, self.module, self.x, self.dy = fwd, module, x, dy
        self.cuda = x.device.type == "cuda"

    def __call__(self) -> Tensor:
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)
        y = self.fwd(self.x)
        y.backward(self.dy)
        if self.cuda:
            torch.cuda.synchronize()
        return y


def _short_error(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{type(err).__name__}: {msg[:120]}"


# -------------------------------------------------------------------------------------- one part


def run_part(args: argparse.Namespace, name: str, variants: Sequence[str], group: Any,
             device: torch.device) -> dict[str, Any]:
    """Time ``variants`` on every configuration; all ranks of ``group`` call it together."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    rows = []
    for c in args.channels:
        for s in args.spatial:
            g = torch.Generator().manual_seed(args.seed * 7919 + 31 * c + s + 1000 * rank)
            x = (torch.randn(args.batch, c, s, s, generator=g) * 2.0 + 0.5).to(device).requires_grad_(True)
            dy = torch.randn(args.batch, c, s, s, generator=g).to(device)
            iters: dict[str, _Iteration] = {}
            status: dict[str, str] = {}
            errors: dict[str, str] = {}
            for v in variants:
                fwd, m = build_forward(v, c, device, group)
                it = _Iteration(fwd, m, x, dy)
                try:  # a variant that refuses this device (torch's SyncBatchNorm on CPU) is n/a
                    it()
                except (RuntimeError, ValueError) as err:
                    if v != "torch_syncbn":
                        raise
                    status[v] = f"n/a (refuses {device.type.upper()})"
                    errors[v] = _short_error(err)
                    continue
                iters[v] = it
                status[v] = "ok"
            checks = _check(iters, x, dy)
            for v, it in iters.items():
                for _ in range(args.warmup):
                    it()
            counted = {}
            for v, it in iters.items():
                with count_collectives() as log:
                    it()
                counted[v] = (len(log), sum(b for _, b in log))
            times = common.time_interleaved(iters, args.reps, args.block)
            names = list(iters)
            flat = common.max_over_ranks([t for v in names for t in times[v]], group)
            times = {v: flat[i * args.reps:(i + 1) * args.reps] for i, v in enumerate(names)}
            cells: dict[str, Any] = {}
            for v in variants:
                if v not in iters:
                    cells[v] = {"status": status[v], "error": errors[v]}
                    continue
                entry: dict[str, Any] = {"status": "ok", **common.summarize_ms(times[v]),
                                         "collectives": counted[v][0], "payload_bytes": counted[v][1]}
                cells[v] = entry
            base = cells["local"]["median_ms"]
            for v, entry in cells.items():
                if entry["status"] == "ok":
                    entry["ratio_to_local"] = entry["median_ms"] / base
            rows.append({"N": args.batch, "C": c, "H": s, "W": s,
                         "values_per_channel": args.batch * s * s * world,
                         "activation_bytes": args.batch * c * s * s * x.element_size(),
                         "variants": cells, "checks": checks})
    return {"name": name, "world_size": world, "baseline": "local", "variants": list(variants), "rows": rows}


def _check(iters: dict[str, _Iteration], x: Tensor, dy: Tensor) -> dict[str, float]:
    """Max |difference| of outputs and input gradients: syncnorm vs naive, nopeer vs local."""
    out = {}
    pairs = [("syncnorm", "naive_allgather"), ("syncnorm_fn_1rank", "naive_allgather"),
             ("syncnorm_nopeer", "local")]
    for a, b in pairs:
        if a in iters and b in iters:
            ya = iters[a]().detach().clone()
            ga = x.grad.detach().clone()
            yb = iters[b]().detach().clone()
            gb = x.grad.detach().clone()
            out[f"{a}_vs_{b}_max_abs_out"] = float((ya - yb).abs().max())
            out[f"{a}_vs_{b}_max_abs_grad"] = float((ga - gb).abs().max())
    return out


# ------------------------------------------------------------------------------------- reporting


def _cell(entry: dict[str, Any]) -> str:
    if entry["status"] != "ok":
        return entry["status"]
    return f"{entry['median_ms']:.3f} (x{entry['ratio_to_local']:.2f})"


def _table(part: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["N,C,HxW"] + [f"{v} ms (x local)" for v in part["variants"]]
    rows = []
    for r in part["rows"]:
        rows.append([f"{r['N']},{r['C']},{r['H']}x{r['W']}"] + [_cell(r["variants"][v]) for v in part["variants"]])
    return header, rows


def _na_reasons(part: dict[str, Any]) -> list[str]:
    return sorted({f"{v}: {e['status']}, error caught: {e['error']}" for r in part["rows"]
                   for v, e in r["variants"].items() if e["status"] != "ok"})


def _comm_line(part: dict[str, Any]) -> str:
    r = part["rows"][-1]
    bits = [f"{v}: {e['collectives']} coll, {common.fmt_bytes(e['payload_bytes'])}"
            for v, e in r["variants"].items() if e["status"] == "ok" and e["collectives"]]
    return f"collectives per fwd+bwd at C={r['C']} (counted): " + ("; ".join(bits) or "none")


def _check_lines(part: dict[str, Any]) -> list[str]:
    worst: dict[str, float] = {}
    for r in part["rows"]:
        for k, v in r["checks"].items():
            worst[k] = max(worst.get(k, 0.0), v)
    return [f"check {k}: {v:.2e}" for k, v in sorted(worst.items())]


def _part_title(part: dict[str, Any], results: dict[str, Any]) -> str:
    who = ("all ranks concurrently" if part["name"] == "w2" else "rank 0 alone, other ranks idle")
    return (f"layer fwd+bwd, W={part['world_size']} ({who}), {results['config']['device']}, "
            f"median of {results['config']['reps']} iterations, ms (x local)")


def summary(results: dict[str, Any]) -> list[str]:
    """Headline ratios: geometric means over configurations."""
    lines = []
    for part in results["parts"].values():
        for v in part["variants"]:
            ratios = [r["variants"][v]["ratio_to_local"] for r in part["rows"] if r["variants"][v]["status"] == "ok"]
            if ratios and v != "local":
                gm = float(torch.tensor(ratios).log().mean().exp())
                lines.append(f"{part['name']}: {v} / local geometric mean over configs = {gm:.2f} "
                             f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    return lines


def print_tables(results: dict[str, Any]) -> None:
    for part in results["parts"].values():
        header, rows = _table(part)
        notes = [_comm_line(part), *_check_lines(part), *_na_reasons(part)]
        common.print_table(_part_title(part, results), header, rows, notes)
    common.print_table("layer benchmark: summary", ["line"], [[s] for s in summary(results)])


def markdown(results: dict[str, Any]) -> str:
    cfg, t = results["config"], results["timing"]
    lines = [
        "# Layer benchmark: synchronized batch norm forward+backward vs local BatchNorm2d",
        "",
        f"- date: {results['date']}",
        *common.machine_lines(results["machine"]),
        f"- load average (1 min) before/after: {t['loadavg_before'][0] if t['loadavg_before'] else 'n/a'} / "
        f"{t['loadavg_after'][0] if t['loadavg_after'] else 'n/a'}; wall time {t['wall_s']:.1f} s",
        f"- command: `{results['command']}`",
        f"- configs: N={cfg['batch']} per rank, C in {cfg['channels']}, HxW in "
        f"{[f'{s}x{s}' for s in cfg['spatial']]}; {cfg['warmup']} warm-up + {cfg['reps']} timed iterations "
        f"per variant in blocks of {cfg['block']} (variants interleaved, rotating start)",
        "",
    ]
    for part in results["parts"].values():
        header, rows = _table(part)
        lines += [f"## {_part_title(part, results)}", "", common.markdown_table(header, rows), ""]
        lines += [f"- {s}" for s in [_comm_line(part), *_check_lines(part), *_na_reasons(part)]]
        lines.append("")
    lines += ["## Summary", "", *[f"- {s}" for s in summary(results)], "", "## Variants", ""]
    lines += [f"- `{k}`: {v}" for k, v in DESCRIPTIONS.items()]
    lines += ["", f"Timing: {t['method']}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    wall0 = time.perf_counter()
    load_before = common.loadavg()
    world = dist.get_world_size()
    machine = common.machine_info(world, dist.get_backend())  # load average at the start
    parts: dict[str, Any] = {}
    if world >= 2:
        parts["w2"] = run_part(args, "w2", W2_VARIANTS, dist.group.WORLD, device)
    if not args.no_w1 or world == 1:
        sub = dist.new_group([0]) if world > 1 else dist.group.WORLD  # every rank must call new_group
        if dist.get_rank() == 0:
            parts["w1"] = run_part(args, "w1", W1_VARIANTS, sub, device)
        dist.barrier()
    return {
        "benchmark": "benchmarks.layer",
        "date": common.now_iso(),
        "command": "torchrun --nproc_per_node={} -m benchmarks.layer {}".format(world, " ".join(sys.argv[1:])).strip(),
        "config": {"channels": args.channels, "spatial": args.spatial, "batch": args.batch, "reps": args.reps,
                   "warmup": args.warmup, "block": args.block, "device": device.type, "quick": args.quick,
                   "seed": args.seed, "dtype": "float32", "check_tolerance": TOL},
        "machine": machine,
        "variant_descriptions": DESCRIPTIONS,
        "parts": parts,
        "summary": [],
        "timing": {
            "method": "per iteration time.perf_counter around zero_grad + forward + backward(dy) "
                      "(+ cuda synchronize on GPU); w2: element-wise max over ranks after timing; "
                      "median and IQR over iterations; ratio = median / median of local in the same part",
            "loadavg_before": load_before, "loadavg_after": common.loadavg(),
            "wall_s": time.perf_counter() - wall0,
        },
    }


def checks_passed(results: dict[str, Any]) -> bool:
    return all(v <= TOL for part in results["parts"].values() for r in part["rows"] for v in r["checks"].values())


def report(results: dict[str, Any], out: Optional[Path]) -> None:
    """Rank 0: print the tables, write ``results.json`` and ``results.md``."""
    out = out or common.default_out() / "layer"
    print_tables(results)
    js, md = common.write_results(results, markdown(results), out)
    ok = checks_passed(results)
    print(f"wrote {js} and {md}" + ("" if ok else " (CHECK FAILED: syncnorm differs from the reference)"), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")

    def run_all() -> dict[str, Any]:
        results = run(args, device)
        results["summary"] = summary(results)
        return results

    results = common.run_under_torchrun("benchmarks.layer", run_all, lambda r: report(r, args.out),
                                        backend="nccl" if cuda else "gloo", timeout_s=900, min_world=1)
    if results is None:
        return 2
    return 0 if checks_passed(results) else 1


if __name__ == "__main__":
    sys.exit(main())
