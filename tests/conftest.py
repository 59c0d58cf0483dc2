"""Shared fixtures: a one-rank gloo group for driving the synchronized code path in-process."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist


@pytest.fixture
def one_rank_group(tmp_path):
    """An initialized gloo process group of size 1 (FileStore in tmp_path), destroyed afterwards."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    assert not dist.is_initialized(), "a previous test leaked a process group"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
