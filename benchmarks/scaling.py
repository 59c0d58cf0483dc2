"""Latency/bandwidth model of the backend, and the projected BN synchronization cost of ResNet-50.

Run with torchrun (2 ranks)::

    torchrun --nproc_per_node=2 -m benchmarks.scaling [--quick] [--out DIR]

1. Measure: ``all_reduce`` and ``all_gather`` (``all_gather_into_tensor``) of float32 tensors of
   2^4 .. 2^20 bytes per rank on the job's backend; per size the median over many back-to-back
   calls (per-call times combined across ranks with an element-wise max).
2. Fit, per collective, by ordinary least squares: ``t = alpha + beta * bytes`` (bytes = the input
   of one rank).
3. Model: a standard alpha-beta cost model with per-link constants ``a``, ``b``:

   * ring all_reduce (reduce-scatter + all-gather) of n bytes: ``2 (W-1) a + 2 (W-1)/W n b``
   * ring all_gather of n bytes per rank (W n out): ``(W-1) a + (W-1)/W (W n) b``
   * tree variant (recursive halving/doubling, Rabenseifner): the same bandwidth terms with
     latency ``2 log2(W) a`` (all_reduce) and ``log2(W) a`` (all_gather).
   * mixed: all_reduce with the tree latency, all_gather with the ring latency (NCCL's tree
     algorithm exists for all_reduce only; its classic all_gather is a ring).

   At W = 2 every formula reduces to ``k a + n b`` (``k = 2`` for all_reduce, 1 for all_gather),
   so the fit gives ``a = alpha / k`` and ``b = beta`` for each collective, used for that collective
   at every W.
4. Project the per-step synchronization cost of ResNet-50's batch-norm layout (channel counts of
   ``syncnorm.app.models.resnet.build_resnet(50)``: 53 layers, 26,560 channels) for
   W = 2, 8, 16, ..., 1024, under three schemes, per layer:

   * ``syncnorm``: all_reduce of (2C+11)*8 bytes (forward) + all_reduce of 2C*4 bytes (backward)
   * ``torch``: all_gather of (2C+1)*4 bytes per rank, W(2C+1)*4 out (forward) + all_reduce 2C*4 (backward)
   * ``naive``: 2 all_reduce of (2C+1)*4 bytes (forward statistics, their gradient in backward)

   and check the model at W = 2 against the time of the three schemes' real collective sequences
   (106 collectives with ResNet-50's sizes) measured here.

Writes ``results.json``, ``results.md`` and ``scaling.png`` into ``--out`` (default
``benchmarks/results/<date>/scaling``) and prints the tables on rank 0.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from syncnorm.distributed import HEAD_SIZE

from . import common

SCHEMES = ("syncnorm", "torch", "naive")
MODELS = ("ring", "tree", "mixed")
WORLD_SIZES = (2, 8, 16, 32, 64, 128, 256, 512, 1024)
MIN_LOG2, MAX_LOG2 = 4, 20
PASSES = 4


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=2 -m benchmarks.scaling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None,
                   help="timed samples per size and collective (default: 60; --quick: 8)")
    p.add_argument("--block", type=int, default=None,
                   help="back-to-back calls per sample (default: 8; --quick: 4)")
    p.add_argument("--max-log2", type=int, default=MAX_LOG2, help="largest size, log2 bytes (default: 20)")
    p.add_argument("--step-reps", type=int, default=None,
                   help="repetitions of each scheme's per-step collective sequence (default: 15; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="few repetitions, for a smoke test")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results/<date>/scaling)")
    args = p.parse_args(argv)
    common.fill_defaults(args, reps=(60, 8), step_reps=(15, 2), block=(8, 4))
    if args.reps < 2 or args.step_reps < 1 or args.block < 1 or not MIN_LOG2 < args.max_log2 <= 26:
        p.error("expected --reps >= 2, --step-reps >= 1, --block >= 1 and 4 < --max-log2 <= 26")
    return args


# ------------------------------------------------------------------------------------ the model


def resnet50_channels() -> list[int]:
    """Channel count of every batch-norm layer of ResNet-50, in module order (53 layers)."""
    from syncnorm.app.models.resnet import build_resnet

    model = build_resnet(50, num_classes=10, norm=nn.BatchNorm2d)
    return [m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def t_all_reduce(w: int, n: float, a: float, b: float, model: str) -> float:
    """Seconds for an all_reduce of ``n`` bytes over ``w`` ranks (see the module docstring)."""
    if w <= 1:
        return 0.0
    lat = 2 * (w - 1) if model == "ring" else 2 * math.ceil(math.log2(w))  # tree, mixed: log latency
    return lat * a + 2 * (w - 1) / w * n * b


def t_all_gather(w: int, n: float, a: float, b: float, model: str) -> float:
    """Seconds for an all_gather of ``n`` bytes per rank (``w * n`` out) over ``w`` ranks."""
    if w <= 1:
        return 0.0
    lat = math.ceil(math.log2(w)) if model == "tree" else (w - 1)  # ring, mixed: linear latency
    return lat * a + (w - 1) / w * (w * n) * b


def scheme_collectives(scheme: str, channels: Sequence[int]) -> list[tuple[str, int, torch.dtype]]:
    """``(collective, bytes per rank, dtype)`` of one training step of ``scheme``, in issue order."""
    f64, f32 = torch.float64, torch.float32
    out: list[tuple[str, int, torch.dtype]] = []
    for c in channels:
        if scheme == "syncnorm":
            out += [("all_reduce", (2 * c + HEAD_SIZE) * 8, f64), ("all_reduce", 2 * c * 4, f32)]
        elif scheme == "torch":
            out += [("all_gather", (2 * c + 1) * 4, f32), ("all_reduce", 2 * c * 4, f32)]
        elif scheme == "naive":
            out += [("all_reduce", (2 * c + 1) * 4, f32), ("all_reduce", (2 * c + 1) * 4, f32)]
        else:
            raise ValueError(f"unknown scheme {scheme!r}")
    return out


def project(link: dict[str, dict[str, float]], channels: Sequence[int], world_sizes: Sequence[int],
            model: str) -> dict[str, list[float]]:
    """Per-step sync seconds of each scheme at each world size (``link``: per-collective a, b)."""
    out: dict[str, list[float]] = {}
    for scheme in SCHEMES:
        colls = scheme_collectives(scheme, channels)
        row = []
        for w in world_sizes:
            total = 0.0
            for name, n, _ in colls:
                f = t_all_reduce if name == "all_reduce" else t_all_gather
                total += f(w, n, link[name]["a"], link[name]["b"], model)
            row.append(total)
        out[scheme] = row
    return out


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Ordinary least squares ``y = alpha + beta * x``; with R^2 and the largest relative residual."""
    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    a = torch.stack([torch.ones_like(x), x], dim=1)
    sol = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
    alpha, beta = float(sol[0]), float(sol[1])
    pred = alpha + beta * x
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "max_rel_residual": float(((y - pred).abs() / y).max())}


# ------------------------------------------------------------------------------------ measuring


def _gather_fn(out: Tensor, inp: Tensor) -> Callable[[], Any]:
    """``all_gather`` of ``inp`` into the flat ``out`` (what torch's SyncBatchNorm issues)."""
    world = dist.get_world_size()
    if hasattr(dist, "all_gather_into_tensor"):
        def gather() -> Any:
            with warnings.catch_warnings():  # deprecated alias in recent torch; same collective
                warnings.simplefilter("ignore", FutureWarning)
                return dist.all_gather_into_tensor(out, inp)

        return gather
    chunks = list(out.chunk(world))
    return lambda: dist.all_gather(chunks, inp)


def measure_collectives(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per call of all_reduce and all_gather at each size: median over samples.

    One sample is the time of ``args.block`` back-to-back calls divided by ``args.block``: a per-call
    cost that includes the occasional slow call (a descheduled rank), as a training step's sequence
    of collectives does; the median over samples then drops the rare very slow sample. The sizes are
    visited in ``PASSES`` passes (each pass takes a share of the samples of every size), so a slow
    phase of a loaded machine is spread over all sizes instead of bending the fit.
    """
    world = dist.get_world_size()
    sizes = [2 ** k for k in range(MIN_LOG2, args.max_log2 + 1)]
    fns: dict[tuple[int, str], Callable[[], Any]] = {}
    for n in sizes:
        x = torch.ones(n // 4, dtype=torch.float32)
        out = torch.empty(world * (n // 4), dtype=torch.float32)
        fns[(n, "all_reduce")] = lambda x=x: dist.all_reduce(x)
        fns[(n, "all_gather")] = _gather_fn(out, x)
    passes = PASSES if args.reps >= 2 * PASSES else 1
    times: dict[tuple[int, str], list[float]] = {key: [] for key in fns}
    for p in range(passes):
        for key, fn in fns.items():
            reps = args.reps if key[0] <= 2 ** 16 else max(6, args.reps // 3)
            share = reps // passes + (1 if p < reps % passes else 0)
            for _ in range(2):  # warm-up
                fn()
            for _ in range(share):
                t0 = time.perf_counter()
                for _ in range(args.block):
                    fn()
                times[key].append((time.perf_counter() - t0) / args.block)
    keys = list(fns)
    flat = common.max_over_ranks([t for key in keys for t in times[key]])
    res: dict[str, Any] = {"bytes": sizes, "all_reduce": [], "all_gather": [],
                           "all_reduce_iqr": [], "all_gather_iqr": [], "calls": []}
    i = 0
    for key in keys:
        m = len(times[key])
        s = common.summarize_ms(flat[i:i + m])
        i += m
        res[key[1]].append(s["median_ms"] / 1e3)
        res[f"{key[1]}_iqr"].append(s["iqr_ms"] / 1e3)
        if key[1] == "all_reduce":
            res["calls"].append(m)
    return res


def measure_step_sequences(channels: Sequence[int], reps: int) -> dict[str, dict[str, float]]:
    """Time each scheme's per-step collective sequence (real sizes, zeros) at the job's W.

    The schemes take turns (one sequence each, rotating start) so load drifts hit all of them.
    """
    world = dist.get_world_size()
    seqs: dict[str, Callable[[], None]] = {}
    for scheme in SCHEMES:
        calls = []
        for name, n, dtype in scheme_collectives(scheme, channels):
            t = torch.zeros(n // (8 if dtype == torch.float64 else 4), dtype=dtype)
            if name == "all_reduce":
                calls.append(lambda t=t: dist.all_reduce(t))
            else:
                calls.append(_gather_fn(torch.empty(world * t.numel(), dtype=t.dtype), t))

        def seq(calls=calls) -> None:
            for c in calls:
                c()

        seq()  # warm-up
        seqs[scheme] = seq
    times = common.time_interleaved(seqs, reps, 1)
    flat = common.max_over_ranks([t for s in SCHEMES for t in times[s]])
    out = {}
    for i, scheme in enumerate(SCHEMES):
        s = common.summarize_ms(flat[i * reps:(i + 1) * reps])
        out[scheme] = {"median_s": s["median_ms"] / 1e3, "iqr_s": s["iqr_ms"] / 1e3,
                       "collectives": len(scheme_collectives(scheme, channels))}
    return out


# ------------------------------------------------------------------------------------ reporting


def _us(x: float) -> str:
    return f"{x * 1e6:,.1f}"


def _ms(x: float) -> str:
    return f"{x * 1e3:,.2f}"


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """``(title, header, rows, notes)`` of every table."""
    meas, fits, link = results["measured"], results["fit"], results["link"]
    out = []
    header = ["bytes/rank", "all_reduce us", "fit us", "all_gather us", "fit us"]
    rows = []
    for i, n in enumerate(meas["bytes"]):
        row = [f"{n:,}"]
        for name in ("all_reduce", "all_gather"):
            f = fits[name]
            row += [_us(meas[name][i]), _us(f["alpha_s"] + f["beta_s_per_byte"] * n)]
        rows.append(row)
    notes = []
    for name in ("all_reduce", "all_gather"):
        f = fits[name]
        notes.append(f"fit {name} (W={results['world_size']}): alpha = {_us(f['alpha_s'])} us, beta = "
                     f"{f['beta_s_per_byte'] * 1e9:.4f} ns/B ({1 / f['beta_s_per_byte'] / 1e9:.2f} GB/s); R^2 = "
                     f"{f['r2']:.4f}, max relative residual {f['max_rel_residual']:.0%}; per link: a = "
                     f"{_us(link[name]['a'])} us, b = {link[name]['b'] * 1e9:.4f} ns/B"
                     + (" (NEGATIVE fit term clamped to 0: noisy measurement)" if link[name]["clamped"] else ""))
    cfg = results["config"]
    out.append((f"collective time per call on {results['machine']['backend']}, W={results['world_size']}, "
                f"median of {cfg['reps']} samples of {cfg['calls_per_sample']} back-to-back calls", header, rows, notes))

    chk = results["check_w2"]
    header = ["scheme", "collectives/step", "bytes/rank/step", "measured ms", "ring model ms", "model / measured"]
    rows = []
    for s in SCHEMES:
        colls = scheme_collectives(s, results["channels"])
        pred = results["projection"]["ring"][s][0]
        rows.append([s, str(len(colls)), common.fmt_bytes(sum(n for _, n, _ in colls)),
                     _ms(chk[s]["median_s"]), _ms(pred), f"{pred / chk[s]['median_s']:.2f}"])
    out.append((f"ResNet-50 BN sync per step at W={results['world_size']}: measured collective sequence vs model",
                header, rows, []))

    for model in MODELS:
        proj = results["projection"][model]
        header = ["W"] + [f"{s} ms" for s in SCHEMES] + ["syncnorm/torch", "syncnorm/naive"]
        rows = []
        for i, w in enumerate(results["world_sizes"]):
            v = [proj[s][i] for s in SCHEMES]
            rows.append([str(w)] + [_ms(x) for x in v] + [f"{v[0] / v[1]:.2f}", f"{v[0] / v[2]:.2f}"])
        out.append((f"projected ResNet-50 BN sync cost per training step ({model} model, 53 layers, "
                    f"26,560 channels)", header, rows, [results["formulas"][model]]))
    return out


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = results["world_sizes"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"syncnorm": "tab:blue", "torch": "tab:orange", "naive": "tab:green"}
    markers = {"syncnorm": "s", "torch": "o", "naive": "^"}
    for model, style in (("ring", "-"), ("tree", "--"), ("mixed", ":")):
        for s in reversed(SCHEMES):  # syncnorm last, on top (naive's cost is within 1 % of it)
            ax.plot(ws, [x * 1e3 for x in results["projection"][model][s]], style, marker=markers[s],
                    ms=3.5 if s == "syncnorm" else 5, mfc="none" if s != "syncnorm" else None,
                    color=colors[s], label=f"{s} ({model})", zorder=3 if s == "syncnorm" else 2)
    chk = results["check_w2"]
    ax.scatter([results["world_size"]] * len(SCHEMES), [chk[s]["median_s"] * 1e3 for s in SCHEMES],
               marker="x", color=[colors[s] for s in SCHEMES], zorder=5, label=f"measured, W={results['world_size']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world size W")
    ax.set_ylabel("BN synchronization per training step (ms)")
    fa, fg = results["fit"]["all_reduce"], results["fit"]["all_gather"]
    ax.set_title("ResNet-50 (53 BN layers): projected sync cost (naive's lines lie under syncnorm's)\n"
                 f"alpha-beta fit on {results['machine']['backend']}: all_reduce alpha={fa['alpha_s'] * 1e6:.0f} us, "
                 f"all_gather alpha={fg['alpha_s'] * 1e6:.0f} us", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(results: dict[str, Any]) -> str:
    t = results["timing"]
    lines = [
        "# Scaling model: alpha-beta fit of the backend and projected BN sync cost of ResNet-50",
        "",
        f"- date: {results['date']}",
        *common.machine_lines(results["machine"]),
        f"- load average (1 min) before/after: {t['loadavg_before'][0] if t['loadavg_before'] else 'n/a'} / "
        f"{t['loadavg_after'][0] if t['loadavg_after'] else 'n/a'}; wall time {t['wall_s']:.1f} s",
        f"- command: `{results['command']}`",
        f"- plot: `{results['plot']}`",
        "",
    ]
    for title, header, rows, notes in tables(results):
        lines += [f"## {title}", "", common.markdown_table(header, rows), ""]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    lines += ["## Method", "", *[f"- {x}" for x in results["method"]], ""]
    return "\n".join(lines)


FORMULAS = {
    "ring": "ring: all_reduce(n) = 2(W-1) a + 2(W-1)/W n b; all_gather(n per rank) = (W-1) a + (W-1)/W (W n) b",
    "tree": "tree (recursive halving/doubling): all_reduce(n) = 2 log2(W) a + 2(W-1)/W n b; "
            "all_gather(n per rank) = log2(W) a + (W-1)/W (W n) b",
    "mixed": "mixed: all_reduce(n) = 2 log2(W) a + 2(W-1)/W n b (tree); all_gather(n per rank) = "
             "(W-1) a + (W-1)/W (W n) b (ring), as NCCL offers a tree only for all_reduce",
}
"""The alpha-beta cost formulas of the three algorithm models (see the module docstring)."""


METHOD = [
    "per size and collective: 2 warm-up calls, then samples of `calls_per_sample` back-to-back calls "
    "(time.perf_counter around the block, divided by the calls), max-reduced over ranks, median over "
    "samples; sizes visited in `passes` interleaved passes; float32 tensors of 2^4..2^max bytes per rank",
    "fit: ordinary least squares t = alpha + beta * bytes per collective over all sizes",
    "per-link constants: at W ranks the ring formulas give all_reduce = 2(W-1) a + 2(W-1)/W n b and "
    "all_gather = (W-1) a + (W-1) n b; inverted at the measured W (at W=2 ring and tree coincide)",
    FORMULAS["ring"], FORMULAS["tree"], FORMULAS["mixed"],
    "per-step cost = sum over ResNet-50's 53 BN layers of the scheme's collectives; compute, overlap "
    "and DDP's gradient buckets are not included; the latency a includes gloo's per-call software "
    "overhead on this machine (loopback), not a cluster network's",
    "check: each scheme's per-step sequence of collectives with the real sizes, timed at the job's W, "
    "against the model at that W",
]
"""How the numbers were obtained (written into the results)."""


# ------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    wall0 = time.perf_counter()
    load_before = common.loadavg()
    world = dist.get_world_size()
    machine = common.machine_info(world, dist.get_backend())  # load average at the start
    meas = measure_collectives(args)
    fits = {name: fit_line(meas["bytes"], meas[name]) for name in ("all_reduce", "all_gather")}
    # invert the W-rank formulas at the measured W: latency k(W) a, bandwidth c(W) n b
    k = {"all_reduce": 2 * (world - 1), "all_gather": world - 1}
    c = {"all_reduce": 2 * (world - 1) / world, "all_gather": world - 1}
    # a noisy fit (a loaded machine, --quick) can give a negative slope or intercept: the model
    # then uses 0 for it, and says so
    link = {name: {"a": max(fits[name]["alpha_s"], 0.0) / k[name],
                   "b": max(fits[name]["beta_s_per_byte"], 0.0) / c[name],
                   "clamped": fits[name]["alpha_s"] < 0 or fits[name]["beta_s_per_byte"] < 0}
            for name in fits}
    channels = resnet50_channels()
    world_sizes = sorted({world, *WORLD_SIZES[1:]})
    proj = {m: project(link, channels, world_sizes, m) for m in MODELS}
    check = measure_step_sequences(channels, args.step_reps)
    return {
        "benchmark": "benchmarks.scaling",
        "date": common.now_iso(),
        "command": "torchrun --nproc_per_node={} -m benchmarks.scaling {}".format(world, " ".join(sys.argv[1:])).strip(),
        "config": {"reps": args.reps, "reps_above_64KiB": max(6, args.reps // 3), "passes": PASSES,
                   "calls_per_sample": args.block, "step_reps": args.step_reps,
                   "sizes_log2": [MIN_LOG2, args.max_log2], "dtype": "float32", "quick": args.quick},
        "machine": machine,
        "world_size": world,
        "measured": meas,
        "fit": fits,
        "link": link,
        "channels": channels,
        "bn_layers": len(channels),
        "bn_channels": sum(channels),
        "world_sizes": world_sizes,
        "projection": proj,
        "projection_step_bytes_per_rank": {s: sum(n for _, n, _ in scheme_collectives(s, channels)) for s in SCHEMES},
        "check_w2": check,
        "formulas": FORMULAS,
        "schemes": {
            "syncnorm": "per layer: all_reduce (2C+11)*8 B (fwd, float64 [signature head (9), N, N - 1, sum, sumsq about the shift]) + all_reduce 2C*4 B (bwd)",
            "torch": "per layer: all_gather (2C+1)*4 B per rank -> W(2C+1)*4 B (fwd: mean, invstd, count) + all_reduce 2C*4 B (bwd)",
            "naive": "per layer: all_reduce (2C+1)*4 B (fwd statistics) + all_reduce (2C+1)*4 B (their gradient, bwd)",
        },
        "method": METHOD,
        "timing": {"loadavg_before": load_before, "loadavg_after": common.loadavg(),
                   "wall_s": time.perf_counter() - wall0},
    }


def report(results: dict[str, Any], out: Optional[Path]) -> None:
    """Rank 0: the plot, the tables, ``results.json`` and ``results.md``."""
    out = out or common.default_out() / "scaling"
    results["plot"] = str(plot(results, out / "scaling.png"))
    for title, header, rows, notes in tables(results):
        common.print_table(title, header, rows, notes)
    js, md = common.write_results(results, markdown(results), out)
    print(f"wrote {js}, {md} and {results['plot']}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    results = common.run_under_torchrun("benchmarks.scaling", lambda: run(args), lambda r: report(r, args.out))
    return 2 if results is None else 0


if __name__ == "__main__":
    sys.exit(main())
