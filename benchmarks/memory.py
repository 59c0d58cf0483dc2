"""Memory of a synchronized batch norm's forward+backward against local ``BatchNorm2d`` (W=1).

Run in one process (a one-rank gloo group is set up for the naive references)::

    python -m benchmarks.memory [--quick] [--out DIR]

Two measurements per configuration (N, C, HxW) and variant:

* saved for backward: every tensor autograd keeps between forward and backward, seen with
  ``torch.autograd.graph.saved_tensors_hooks`` during the forward, deduplicated by storage and
  split into the *input* (shared with ``x``, no copy), *state* (the layer's own parameters and
  buffers, no copy) and *new* tensors created by the forward (the memory the layer adds while the
  activations wait for backward). An activation-sized new tensor is an activation copy.
* peak: the largest net CPU allocation during ``y = f(x); y.backward(dy); del y`` (output, input
  gradient and temporaries), from the allocation events of ``torch.profiler`` with
  ``profile_memory=True``; in units of one activation (N*C*H*W*4 bytes) too.

Variants: ``local`` (``torch.nn.BatchNorm2d``), ``syncnorm`` (the synchronized code path,
:class:`syncnorm.engine`'s synchronized Function; what it saves does not depend on the group),
``naive_allgather`` and ``naive_allreduce`` (the autograd references of the layer and step
benchmarks, on the one-rank group).

Writes ``results.json`` and ``results.md`` into ``--out`` (default
``benchmarks/results/<date>/memory``) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

import syncnorm

from . import common
from .layer import naive_allgather_bn, syncnorm_function
from .variants import naive_allreduce_bn

VARIANTS = ("local", "syncnorm", "naive_allgather", "naive_allreduce")
CHANNELS = (64, 256, 1024)
SPATIAL = (8, 32)
BATCH = 8
SMALL_TENSORS_ALLOWED = 4
"""Goal: syncnorm's new saved bytes <= local's + this many C-sized float64 tensors (+ scalars)."""

FORMULA = [
    "local BatchNorm2d (torch's native CPU kernel) saves x (the input itself), weight, running_mean, "
    "running_var (the layer's own tensors) and save_mean, save_invstd: new = 2C float32 = 8C bytes",
    "syncnorm saves x (the input itself), the affine scale (= weight, the layer's own), the global mean "
    "and biased variance (2C in the statistics dtype, float32 here; float64 only for large-offset data); "
    "the count is a Python number on CPU: new = 8C bytes, whatever W, as much as local BatchNorm; no "
    "normalized copy of x is kept (backward recomputes x - mean from x)",
    "naive (autograd) references keep what their autograd graph needs: the gathered (W, 2C+1) "
    "statistics grow with W; the rest is measured below",
]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS))
    p.add_argument("--spatial", type=int, nargs="+", default=list(SPATIAL))
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--quick", action="store_true", help="accepted for symmetry: the measurement is already quick")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results/<date>/memory)")
    return p.parse_args(argv)


@contextlib.contextmanager
def one_rank_group() -> Iterator[Any]:
    """An initialized group as it is, else a one-rank gloo group on a FileStore (destroyed after)."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=120))
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def build(variant: str, c: int, group: Any) -> tuple[Callable[[Tensor], Tensor], nn.Module]:
    if variant == "local":
        m: nn.Module = nn.BatchNorm2d(c)
        return m, m
    if variant == "syncnorm":
        m = syncnorm.SyncBatchNorm(c)
        return syncnorm_function(m, None), m
    m = nn.BatchNorm2d(c)
    if variant == "naive_allgather":
        return (lambda x: naive_allgather_bn(x, m, group)), m
    if variant == "naive_allreduce":
        return (lambda x: naive_allreduce_bn(x, m, group)), m
    raise ValueError(f"benchmarks.memory: unknown variant {variant!r}")


def _storage_key(t: Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def saved_tensors(fwd: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor) -> dict[str, Any]:
    """Bytes autograd saves during ``fwd(x)``, by storage, split into input / state / new."""
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    x_key = _storage_key(x)
    state = {_storage_key(t) for t in list(module.parameters()) + list(module.buffers())}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in seen:
            kind = "input" if key == x_key else "state" if key in state else "new"
            seen[key] = {"kind": kind, "bytes": key[1], "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fwd(x)
    del y
    act = x.numel() * x.element_size()
    out: dict[str, Any] = {"tensors": list(seen.values())}
    for kind in ("input", "state", "new"):
        out[f"{kind}_bytes"] = sum(s["bytes"] for s in seen.values() if s["kind"] == kind)
    out["total_bytes"] = sum(s["bytes"] for s in seen.values())
    out["activation_copies"] = sum(1 for s in seen.values() if s["kind"] == "new" and s["bytes"] >= act)
    out["new_tensors"] = sum(1 for s in seen.values() if s["kind"] == "new")
    return out


def peak_bytes(fwd: Callable[[Tensor], Tensor], x: Tensor, dy: Tensor) -> Optional[int]:
    """Largest net allocation during forward + backward (``None`` where the profiler API is missing)."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = fwd(x)
        y.backward(dy)
        del y
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    allocs: list[tuple[int, int]] = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    cur = peak = 0
    for _, size in sorted(allocs):
        cur += size
        peak = max(peak, cur)
    return peak


def run(args: argparse.Namespace) -> dict[str, Any]:
    wall0 = time.perf_counter()
    load_before = common.loadavg()
    torch.set_num_threads(1)
    rows = []
    with one_rank_group() as group:
        world = dist.get_world_size(group)
        machine = common.machine_info(world, dist.get_backend(group))  # load average at the start
        for c in args.channels:
            for s in args.spatial:
                g = torch.Generator().manual_seed(c * 100 + s)
                x = (torch.randn(args.batch, c, s, s, generator=g) * 2 + 0.5).requires_grad_(True)
                dy = torch.randn(args.batch, c, s, s, generator=g)
                act = x.numel() * x.element_size()
                cells = {}
                for v in VARIANTS:
                    fwd, m = build(v, c, group)
                    m.train()
                    fwd(x).backward(dy)  # warm-up: lazy allocations outside the measurement
                    saved = saved_tensors(fwd, m, x)
                    peak = peak_bytes(fwd, x, dy)
                    cells[v] = {**saved, "peak_bytes": peak, "peak_activations": None if peak is None else peak / act}
                base = cells["local"]
                for v, e in cells.items():
                    e["new_minus_local_bytes"] = e["new_bytes"] - base["new_bytes"]
                    e["peak_over_local"] = (None if e["peak_bytes"] is None or not base["peak_bytes"]
                                            else e["peak_bytes"] / base["peak_bytes"])
                rows.append({"N": args.batch, "C": c, "H": s, "W": s, "activation_bytes": act,
                             "syncnorm_formula_new_bytes": 8 * c, "local_formula_new_bytes": 8 * c,
                             "goal_new_bytes_max": base["new_bytes"] + SMALL_TENSORS_ALLOWED * 8 * c + 64,
                             "goal_met": cells["syncnorm"]["new_bytes"] <= base["new_bytes"] + SMALL_TENSORS_ALLOWED * 8 * c + 64
                             and cells["syncnorm"]["activation_copies"] == 0,
                             "variants": cells})
    return {
        "benchmark": "benchmarks.memory",
        "date": common.now_iso(),
        "command": "python -m benchmarks.memory " + " ".join(sys.argv[1:]),
        "config": {"channels": args.channels, "spatial": args.spatial, "batch": args.batch, "dtype": "float32",
                   "world_size": world},
        "machine": machine,
        "variants": list(VARIANTS),
        "rows": rows,
        "goal": f"syncnorm: no activation copy saved, new saved bytes <= local's + {SMALL_TENSORS_ALLOWED} "
                "C-sized float64 tensors (+64 B)",
        "goal_met": all(r["goal_met"] for r in rows),
        "formula": FORMULA,
        "method": [
            "saved: torch.autograd.graph.saved_tensors_hooks during one forward; tensors deduplicated by "
            "storage; input = shares x's storage, state = shares a parameter/buffer's storage, new = the rest",
            "peak: torch.profiler(profile_memory=True) allocation events of forward + backward + del y, "
            "cumulative sum, maximum; x, dy and the layer exist before (not counted); x.grad is counted",
        ],
        "timing": {"loadavg_before": load_before, "loadavg_after": common.loadavg(),
                   "wall_s": time.perf_counter() - wall0},
    }


def _table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["N,C,HxW", "variant", "saved: input", "saved: state", "saved: new", "new - local",
              "act. copies", "peak fwd+bwd", "peak (activations)", "peak / local"]
    rows = []
    for r in results["rows"]:
        for v in results["variants"]:
            e = r["variants"][v]
            rows.append([
                f"{r['N']},{r['C']},{r['H']}x{r['W']}", v, common.fmt_bytes(e["input_bytes"]),
                common.fmt_bytes(e["state_bytes"]), common.fmt_bytes(e["new_bytes"]),
                f"{e['new_minus_local_bytes']:+,} B", str(e["activation_copies"]),
                "n/a" if e["peak_bytes"] is None else common.fmt_bytes(e["peak_bytes"]),
                "n/a" if e["peak_activations"] is None else f"{e['peak_activations']:.2f}",
                common.fmt_ratio(e["peak_over_local"]),
            ])
    return header, rows


def _notes(results: dict[str, Any]) -> list[str]:
    return [f"goal ({results['goal']}): {'met' if results['goal_met'] else 'NOT met'}", *results["formula"]]


def markdown(results: dict[str, Any]) -> str:
    header, rows = _table(results)
    t = results["timing"]
    return "\n".join([
        "# Memory: synchronized batch norm forward+backward vs local BatchNorm2d (W=1)",
        "",
        f"- date: {results['date']}",
        *common.machine_lines(results["machine"]),
        f"- load average (1 min) before/after: {t['loadavg_before'][0] if t['loadavg_before'] else 'n/a'} / "
        f"{t['loadavg_after'][0] if t['loadavg_after'] else 'n/a'}; wall time {t['wall_s']:.1f} s",
        f"- command: `{results['command']}`",
        "",
        common.markdown_table(header, rows),
        "",
        *[f"- {n}" for n in _notes(results)],
        "",
        "Method:",
        "",
        *[f"- {m}" for m in results["method"]],
        "",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    results = run(args)
    out = args.out or common.default_out() / "memory"
    header, rows = _table(results)
    common.print_table(f"memory per layer, fwd+bwd, W={results['config']['world_size']}, float32", header, rows,
                       _notes(results), left=(0, 1))
    js, md = common.write_results(results, markdown(results), out)
    print(f"wrote {js} and {md}", flush=True)
    return 0 if results["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
