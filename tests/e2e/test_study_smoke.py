"""The small-batch study driver end to end, reduced (--quick): outputs exist with the right columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]


def test_study_quick_writes_table_plot_and_matching_sync_curve(tmp_path):
    out = tmp_path / "study"
    # the benchmarks are not installed: the repository on the path, as when run from its root
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.study", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"SyncBN (2x2)", "BN batch 4 (1 proc)"}
    for m in results["methods"].values():
        assert {"acc_mean", "acc_std", "wall_s_mean", "runs", "procs"} <= set(m)
        assert 0.0 <= m["acc_mean"] <= 1.0 and m["wall_s_mean"] > 0
        assert m["runs"][0]["curve"] and "val_acc" in m["runs"][0]["curve"][0]
    # 2 ranks x batch 2 with SyncBatchNorm trains exactly like 1 process x batch 4
    sync, single = results["methods"]["SyncBN (2x2)"], results["methods"]["BN batch 4 (1 proc)"]
    assert sync["acc_mean"] == pytest.approx(single["acc_mean"], abs=1e-6)
    assert (out / "accuracy.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert "| method | procs x batch | final val acc (mean +- std) | wall s (mean) |" in md
