"""Smoke test of the whole benchmark suite: ``python -m benchmarks all --quick``.

Runs the one command users run (it launches the multi-rank parts with ``torch.distributed.run``) in
a subprocess with a hard timeout, then checks every part's files: the columns and keys each
``results.json`` promises, positive times, the PNG of the scaling model, and the memory goal
(syncnorm saves no activation copy and at most a few C-sized tensors more than BatchNorm2d).
The quick run is designed to take well under 90 s on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.__main__ import PARTS
from benchmarks.layer import W1_VARIANTS, W2_VARIANTS
from benchmarks.memory import VARIANTS as MEMORY_VARIANTS
from benchmarks.step import COLUMNS
from benchmarks.scaling import MODELS, SCHEMES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("bench") / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    t0 = time.perf_counter()
    # the ResNet-18 step part is the same code as ResNet-50's on another model: left out to save a run
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "all", "--quick", "--skip", "step_resnet18",
                           "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"benchmark failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return out, wall


def _load(path: Path) -> dict:
    assert path.is_file(), f"missing {path}"
    return json.loads(path.read_text())


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_summary_and_every_part(quick_run: tuple[Path, float]) -> None:
    out, wall = quick_run
    summary = _load(out / "results.json")
    assert summary["quick"] is True and list(summary["parts"]) == [p for p in PARTS if p != "step_resnet18"]
    for name, part in summary["parts"].items():
        assert part["status"] == "ok", (name, part)
        assert part["wall_s"] > 0 and part["headline"], name
        assert (out / name / "results.json").is_file() and (out / name / "results.md").is_file(), name
        assert (out / name / "log.txt").is_file(), name
    machine = summary["machine"]
    assert {"cpu_model", "cpu_cores", "torch", "loadavg"} <= set(machine)
    md = (out / "results.md").read_text()
    assert md.startswith("# syncnorm benchmarks") and "load average" in md and machine["cpu_model"] in md
    print(f"bench all --quick: {wall:.1f} s")


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_layer_part(quick_run: tuple[Path, float]) -> None:
    res = _load(quick_run[0] / "layer" / "results.json")
    assert set(res["parts"]) == {"w1", "w2"}
    assert res["parts"]["w2"]["world_size"] == 2 and res["parts"]["w1"]["world_size"] == 1
    for name, expected in (("w2", W2_VARIANTS), ("w1", W1_VARIANTS)):
        part = res["parts"][name]
        assert part["variants"] == list(expected) and part["rows"]
        for row in part["rows"]:
            assert {"N", "C", "H", "W", "variants", "checks"} <= set(row)
            assert all(v <= res["config"]["check_tolerance"] for v in row["checks"].values()), row["checks"]
            for v in expected:
                e = row["variants"][v]
                if v == "torch_syncbn" and res["config"]["device"] == "cpu":
                    assert e["status"] == "n/a (refuses CPU)" and "GPU" in e["error"]
                    continue
                assert e["status"] == "ok", (name, v, e)
                assert e["median_ms"] > 0 and e["ratio_to_local"] > 0 and e["n_steps"] == res["config"]["reps"]
            assert row["variants"]["local"]["ratio_to_local"] == 1.0
            if name == "w2":
                assert row["variants"]["syncnorm"]["collectives"] == 2
                assert row["variants"]["local"]["collectives"] == 0


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_step_parts(quick_run: tuple[Path, float]) -> None:
    for model, layers in (("resnet50", 53),):
        res = _load(quick_run[0] / f"step_{model}" / "results.json")
        assert res["config"]["model"] == model and res["config"]["bn_layers"] == layers
        assert list(res["variants"]) == ["local", "floor", "syncnorm", "naive"]
        for name, entry in res["variants"].items():
            assert not set(COLUMNS) - set(entry), name
            assert entry["median_ms"] > 0 and entry["counted_collectives_per_step"] == entry["collectives_per_step"]
        assert res["variants"]["local"]["collectives_per_step"] == 0
        assert res["variants"]["local"]["ratio_to_local"] == 1.0
        for name in ("floor", "syncnorm", "naive"):
            assert res["variants"][name]["collectives_per_step"] == 2 * layers, name
        for name, entry in res["variants"].items():
            assert entry["n_steps"] == res["config"]["steps"], name
            assert entry["counted_bytes_per_step"] == entry["bytes_per_step"], name
        assert res["ratios"]["syncnorm_over_floor"] > 0 and res["ratios"]["syncnorm_over_naive"] > 0
        check = res["correctness"]
        assert check["passed"] and check["max_abs_loss_diff"] <= check["tolerance"] == 1e-4
        assert res["machine"]["world_size"] == 2 and res["machine"]["backend"] == "gloo"
        assert "loadavg" in res["machine"]
        assert (quick_run[0] / f"step_{model}" / "results.md").read_text().startswith("# Step-time benchmark")


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_scaling_part(quick_run: tuple[Path, float]) -> None:
    out = quick_run[0] / "scaling"
    res = _load(out / "results.json")
    png = out / "scaling.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert res["world_size"] == 2 and res["bn_layers"] == 53 and res["bn_channels"] == 26_560
    n = len(res["measured"]["bytes"])
    assert res["measured"]["bytes"][0] == 16 and res["measured"]["bytes"][-1] == 2 ** 20
    for coll in ("all_reduce", "all_gather"):
        assert len(res["measured"][coll]) == n and min(res["measured"][coll]) > 0
        assert {"alpha_s", "beta_s_per_byte", "r2"} <= set(res["fit"][coll])
        assert res["link"][coll]["a"] >= 0 and res["link"][coll]["b"] >= 0
    assert {8, 16, 1024} <= set(res["world_sizes"])
    assert set(res["projection"]) == set(MODELS)
    for model in MODELS:
        for scheme in SCHEMES:
            vals = res["projection"][model][scheme]
            assert len(vals) == len(res["world_sizes"]) and all(v > 0 for v in vals)
            assert vals == sorted(vals), (model, scheme)  # more ranks never cost less
    for scheme in SCHEMES:
        assert res["check_w2"][scheme]["median_s"] > 0 and res["check_w2"][scheme]["collectives"] == 106
    assert set(res["formulas"]) == set(MODELS)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_memory_part(quick_run: tuple[Path, float]) -> None:
    res = _load(quick_run[0] / "memory" / "results.json")
    assert res["variants"] == list(MEMORY_VARIANTS) and res["rows"]
    for row in res["rows"]:
        c, e = row["C"], row["variants"]
        local, sync = e["local"], e["syncnorm"]
        for v in MEMORY_VARIANTS:
            assert e[v]["input_bytes"] == row["activation_bytes"], v  # x itself is saved, not copied
            assert e[v]["peak_bytes"] is None or e[v]["peak_bytes"] > 0
        # no activation copy; at most a few C-sized tensors beyond what BatchNorm keeps
        assert sync["activation_copies"] == 0
        assert sync["new_bytes"] <= local["new_bytes"] + 4 * 8 * c + 64
        assert sync["new_bytes"] == row["syncnorm_formula_new_bytes"]
    assert res["goal_met"] is True
