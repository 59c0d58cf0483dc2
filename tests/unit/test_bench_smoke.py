"""Smoke test of the step benchmark: ``torchrun --standalone`` with 2 gloo ranks, ``--quick``.

Runs the real entry point (the way users run it) in a subprocess with a hard timeout and checks the
files it writes: four variants with positive medians and every expected column, the collective
counts seen at run time equal to the analytic ones, and the syncnorm-vs-naive loss check passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.step import COLUMNS
from benchmarks.variants import VARIANTS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
@pytest.mark.timeout(320)
def test_step_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "benchmarks.step", "--quick", "--out", str(out),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"benchmark failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# Step-time benchmark")
    assert list(results["variants"]) == list(VARIANTS) == ["local", "floor", "syncnorm", "naive"]
    for name, entry in results["variants"].items():
        missing = set(COLUMNS) - set(entry)
        assert not missing, f"{name}: missing columns {sorted(missing)}"
        assert entry["median_ms"] > 0 and entry["n_steps"] == results["config"]["steps"]
        assert entry["counted_collectives_per_step"] == entry["collectives_per_step"], name
        assert entry["counted_bytes_per_step"] == entry["bytes_per_step"], name
    layers = results["config"]["bn_layers"]
    assert results["variants"]["local"]["collectives_per_step"] == 0
    for name in ("floor", "syncnorm", "naive"):
        assert results["variants"][name]["collectives_per_step"] == 2 * layers
    assert results["variants"]["local"]["ratio_to_local"] == 1.0
    assert {"syncnorm_over_floor", "syncnorm_over_naive"} <= set(results["ratios"])
    check = results["correctness"]
    assert check["passed"] and check["max_abs_loss_diff"] <= check["tolerance"] == 1e-4
    assert results["machine"]["world_size"] == 2 and results["machine"]["backend"] == "gloo"
