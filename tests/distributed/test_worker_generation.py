"""Which store keys a torchrun worker group creates its process group on
(:func:`syncnorm.distributed.worker_generation`), read from a real c10d rendezvous run in this process.

Every worker group of one job must use keys no other group used, and all workers of a group the
same ones. torchrun's restart count does not give that across hosts (an agent restarting for a
waiting node keeps its count; the two-host proof is ``tests/e2e/test_multihost.py``); the rendezvous
round does. These tests pin down how the round is read, so a torch release that changes the
rendezvous state fails here, by name, instead of hanging a two-host job.
"""

from __future__ import annotations

import base64
import pickle
import socket

import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from syncnorm.distributed import RDZV_ENDPOINT_VAR, rendezvous_round, worker_generation

pytestmark = pytest.mark.distributed

RUN_ID = "generation-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rendezvous():
    """A one-node c10d rendezvous hosted here, as torchrun's agent on node 0 runs it: its endpoint."""
    endpoint = f"127.0.0.1:{_free_port()}"
    handler = get_rendezvous_handler(RendezvousParameters(
        backend="c10d", endpoint=endpoint, run_id=RUN_ID, min_nodes=1, max_nodes=1, is_host=True,
        local_addr="127.0.0.1"))
    yield handler, endpoint
    handler.shutdown()


def test_rendezvous_round_is_the_agents_round_and_each_new_worker_group_gets_a_new_one(rendezvous):
    handler, endpoint = rendezvous
    seen = []
    for _ in range(3):  # what an agent does to start (then restart) its worker group
        handler.next_rendezvous()
        seen.append(rendezvous_round(endpoint, RUN_ID))
    assert seen == [0, 1, 2]


def test_worker_generation_uses_the_round_when_the_launcher_gives_the_endpoint(rendezvous, monkeypatch):
    handler, endpoint = rendezvous
    handler.next_rendezvous()
    handler.next_rendezvous()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", RUN_ID)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv(RDZV_ENDPOINT_VAR, endpoint)
    for count in ("0", "1", "5"):  # whatever this host's agent counted
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", count)
        assert worker_generation() == "round_1"


def test_worker_generation_without_the_endpoint_falls_back_to_the_restart_count(monkeypatch):
    monkeypatch.delenv(RDZV_ENDPOINT_VAR, raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert worker_generation() is None  # not under torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", RUN_ID)
    assert worker_generation() == "attempt_2"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert worker_generation() is None  # torchrun's own first initialization is right


def test_an_unknown_run_id_or_a_malformed_endpoint_is_a_clear_error(rendezvous):
    handler, endpoint = rendezvous
    handler.next_rendezvous()
    with pytest.raises(RuntimeError, match=rf"no rendezvous 'other-job' in the store at {endpoint}"):
        rendezvous_round(endpoint, "other-job")
    with pytest.raises(ValueError, match=r"expected SYNCNORM_RDZV_ENDPOINT as host:port, got '10\.0\.0\.1'"):
        rendezvous_round("10.0.0.1", RUN_ID)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled code ran')",))


def test_the_state_is_unpickled_without_running_anything_else(rendezvous):
    """The round comes from a pickle in the store: only the rendezvous state's own classes load."""
    _, endpoint = rendezvous
    host, port = endpoint.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False)
    store.set("torch.rendezvous.evil", base64.b64encode(pickle.dumps(_Boom())))
    with pytest.raises(RuntimeError, match=r"cannot read the round of rendezvous 'evil'.*builtins\.exec"):
        rendezvous_round(endpoint, "evil")
