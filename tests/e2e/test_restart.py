"""A rank killed mid-training under ``torchrun --max-restarts=1``: the job restarts, resumes from the
last checkpoint (``ckpt_path=last``) and ends exactly (bit for bit) where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ._helpers import env

pytestmark = pytest.mark.distributed

ARGS = ("model.width=8", "data.batch_size=8", "trainer.max_epochs=2", "trainer.limit_train_batches=25",
        "trainer.limit_val_batches=2", "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false",
        "logger=csv", "ckpt_path=last", "seed=7")


def _launch(run_dir, restarts: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "-m", "syncnorm.train", *ARGS, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _final_state(run_dir) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {"global_step": ckpt["global_step"], "epoch": ckpt["epoch"], "state": ckpt["state_dict"]}


@pytest.fixture
def launched():
    """Every launched torchrun, killed with its workers at the end of the test whatever happened."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait(10)


def test_killed_rank_restarts_and_resumes_without_lost_or_repeated_steps(tmp_path, launched):
    reference = _launch(tmp_path / "uninterrupted", restarts=0)
    launched.append(reference)
    out_ref, _ = reference.communicate(timeout=400)
    assert reference.returncode == 0, out_ref[-4000:]

    faulty = _launch(tmp_path / "faulty", restarts=1)
    launched.append(faulty)
    ckpt = tmp_path / "faulty" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and faulty.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first epoch's checkpoint: then kill a rank inside the second epoch
    time.sleep(1.0)
    assert faulty.poll() is None, "the run finished before a rank could be killed (make epochs longer)"
    workers = _children(faulty.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    out, _ = faulty.communicate(timeout=400)
    assert faulty.returncode == 0, out[-4000:]
    # the worker group was restarted and re-joined on keys of its own (one node: the restart count)
    assert "torchrun worker group attempt_1 (restart count 1): rank 1 of 2" in out, out[-3000:]

    ref, got = _final_state(tmp_path / "uninterrupted"), _final_state(tmp_path / "faulty")
    assert got["global_step"] == ref["global_step"] == 2 * 25 and got["epoch"] == ref["epoch"]
    # bit for bit: the checkpoint carries the merges' shifts (NormConversion's state), and every
    # other step of the run is deterministic on CPU
    assert set(got["state"]) == set(ref["state"])
    for k, v in ref["state"].items():
        torch.testing.assert_close(got["state"][k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
