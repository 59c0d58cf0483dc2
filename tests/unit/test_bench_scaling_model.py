"""The pure parts of the benchmarks: the alpha-beta fit, the cost formulas, ResNet-50's layout and
the saved-tensor accounting of the memory benchmark (in-process, no process group)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import memory, scaling
from syncnorm.distributed import HEAD_SIZE


def test_fit_line_recovers_alpha_beta() -> None:
    xs = [2.0 ** k for k in range(4, 21)]
    ys = [30e-6 + 2e-10 * x for x in xs]
    fit = scaling.fit_line(xs, ys)
    assert fit["alpha_s"] == pytest.approx(30e-6, rel=1e-6)
    assert fit["beta_s_per_byte"] == pytest.approx(2e-10, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0) and fit["max_rel_residual"] < 1e-6


def test_cost_formulas() -> None:
    a, b, n = 10e-6, 1e-9, 4096
    for model in scaling.MODELS:  # at W=2 every algorithm is one exchange: k a + n b
        assert scaling.t_all_reduce(2, n, a, b, model) == pytest.approx(2 * a + n * b)
        assert scaling.t_all_gather(2, n, a, b, model) == pytest.approx(a + n * b)
        assert scaling.t_all_reduce(1, n, a, b, model) == 0.0
    w = 64
    assert scaling.t_all_reduce(w, n, a, b, "ring") == pytest.approx(2 * 63 * a + 2 * 63 / 64 * n * b)
    assert scaling.t_all_reduce(w, n, a, b, "tree") == pytest.approx(2 * 6 * a + 2 * 63 / 64 * n * b)
    assert scaling.t_all_gather(w, n, a, b, "ring") == pytest.approx(63 * a + 63 * n * b)
    assert scaling.t_all_gather(w, n, a, b, "tree") == pytest.approx(6 * a + 63 * n * b)
    assert scaling.t_all_gather(w, n, a, b, "mixed") == scaling.t_all_gather(w, n, a, b, "ring")
    assert scaling.t_all_reduce(w, n, a, b, "mixed") == scaling.t_all_reduce(w, n, a, b, "tree")


def test_resnet50_layout_and_scheme_bytes() -> None:
    channels = scaling.resnet50_channels()
    assert len(channels) == 53 and sum(channels) == 26_560
    sync = scaling.scheme_collectives("syncnorm", channels)
    torch_ = scaling.scheme_collectives("torch", channels)
    naive = scaling.scheme_collectives("naive", channels)
    assert len(sync) == len(torch_) == len(naive) == 106
    assert sum(n for _, n, _ in sync) == sum((2 * c + HEAD_SIZE) * 8 + 2 * c * 4 for c in channels)
    assert [name for name, _, _ in torch_[:2]] == ["all_gather", "all_reduce"]
    # bandwidth only: torch's all_gather output grows with W, syncnorm's all_reduce payload does not
    bw = {"all_reduce": {"a": 0.0, "b": 1e-9}, "all_gather": {"a": 0.0, "b": 1e-9}}
    proj = scaling.project(bw, channels, [8, 1024], "ring")
    assert proj["torch"][1] / proj["torch"][0] > 100
    assert proj["syncnorm"][1] / proj["syncnorm"][0] < 1.2
    # latency only: per step, 106 collectives of every scheme; ring latency grows linearly in W
    lat = {"all_reduce": {"a": 1e-5, "b": 0.0}, "all_gather": {"a": 1e-5, "b": 0.0}}
    ring = scaling.project(lat, channels, [8], "ring")
    assert ring["syncnorm"][0] == pytest.approx(106 * 2 * 7 * 1e-5)
    assert ring["torch"][0] == pytest.approx(53 * (7 + 2 * 7) * 1e-5)
    assert all(math.isfinite(v) and v > 0 for vals in ring.values() for v in vals)


def test_saved_tensor_accounting_local_vs_syncnorm() -> None:
    c = 16
    x = torch.randn(4, c, 5, 5, requires_grad=True)
    out = {}
    for v in ("local", "syncnorm"):
        fwd, m = memory.build(v, c, None)
        m.train()
        out[v] = memory.saved_tensors(fwd, m, x)
    act = x.numel() * 4
    assert out["local"]["input_bytes"] == out["syncnorm"]["input_bytes"] == act
    assert out["local"]["new_bytes"] == 8 * c  # save_mean, save_invstd (float32)
    assert out["syncnorm"]["new_bytes"] == 8 * c  # mean, var (float32: the statistics dtype)
    assert out["local"]["activation_copies"] == out["syncnorm"]["activation_copies"] == 0
