"""Two "hosts" on one machine: network namespaces joined by a veth pair, for multi-host tests.

``TwoHosts`` creates two namespaces (``sn<pid>x<n>A``/``...B``, unique per test run), each with its
own ``lo`` and one end of a veth pair (``sn-vA`` with 10.77.0.1/24, ``sn-vB`` with 10.77.0.2/24; the
names exist only inside the namespaces), so each host has its own routes, ports and addresses and
sees the other only through the link, as two machines on a switch do. Only these private addresses
and loopback are used: nothing leaves the namespaces.

``start(host, cmd)`` runs a command inside a host, its output appended to a log file. ``link_down``
/ ``link_up`` cut and restore one host's link (``ip link set ... down``: the kernel drops what is
sent, TCP connections stay open, exactly a pulled cable). ``close()`` kills every process inside
both namespaces (``ip netns pids``, so torchrun's workers, which run in sessions of their own, are
found too) and deletes the namespaces with their veth pair; it runs whatever happened (use the
object as a context manager or through a fixture).

``unavailable_reason()`` says why namespaces cannot be made here (not root, no ``ip``, or
``ip netns add`` refused), for a skip.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Sequence

__all__ = ["Host", "TwoHosts", "unavailable_reason"]

_COUNTER = itertools.count()


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its end of the veth pair and that end's address."""

    label: str      # "hostA" / "hostB", for messages
    netns: str
    ifname: str
    addr: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> Optional[str]:
    """``None`` when network namespaces can be created here, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); CI runs as root"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"sn{os.getpid()}probe{next(_COUNTER)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class TwoHosts:
    """Namespaces ``hostA`` and ``hostB`` joined by a veth pair; see the module docstring."""

    SUBNET = "10.77.0"

    def __init__(self, log_dir: Path) -> None:
        tag = f"sn{os.getpid()}x{next(_COUNTER)}"
        self.a = Host("hostA", f"{tag}A", "sn-vA", f"{self.SUBNET}.1")
        self.b = Host("hostB", f"{tag}B", "sn-vB", f"{self.SUBNET}.2")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[tuple[subprocess.Popen, IO]] = []
        self._made: list[str] = []
        try:
            for host in (self.a, self.b):
                _ip("netns", "add", host.netns)
                self._made.append(host.netns)
                _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("link", "add", self.a.ifname, "netns", self.a.netns, "type", "veth",
                "peer", "name", self.b.ifname, "netns", self.b.netns)
            for host in (self.a, self.b):
                _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
                _ip("-n", host.netns, "link", "set", host.ifname, "up")
            self.wait_reachable()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "TwoHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, host: Host, cmd: Sequence[str], env: dict[str, str], cwd: Path,
              log_name: Optional[str] = None) -> subprocess.Popen:
        """Run ``cmd`` inside ``host`` (a new session), stdout and stderr appended to a log file
        (``<log_dir>/<log_name or host label>.log``, see :meth:`log`)."""
        log = open(self.log_path(log_name or host.label), "a")
        proc = subprocess.Popen(["ip", "netns", "exec", host.netns, *cmd], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs.append((proc, log))
        return proc

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def link_down(self, host: Host) -> None:
        _ip("-n", host.netns, "link", "set", host.ifname, "down")

    def link_up(self, host: Host) -> None:
        _ip("-n", host.netns, "link", "set", host.ifname, "up")
        self.wait_reachable()

    def wait_reachable(self, timeout_s: float = 10.0) -> None:
        """Wait until each host has its route to the other (the link is up on both ends)."""
        deadline = time.monotonic() + timeout_s
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            while True:
                route = _ip("-n", src.netns, "-o", "route", "get", dst.addr, check=False)
                if route.returncode == 0 and f"dev {src.ifname}" in route.stdout:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{src.label} has no route to {dst.addr}: {route.stdout}{route.stderr}")
                time.sleep(0.05)

    def pids(self, host: Optional[Host] = None) -> list[int]:
        """Every process inside ``host`` (default: inside either namespace)."""
        out: list[int] = []
        for ns in ([host.netns] if host is not None else self._made):
            proc = _ip("netns", "pids", ns, check=False)
            out += [int(p) for p in proc.stdout.split() if p.isdigit()]
        return out

    def commands(self, host: Host) -> dict[int, list[str]]:
        """``{pid: argv}`` of the processes inside ``host``."""
        out = {}
        for pid in self.pids(host):
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:  # ended meanwhile
                continue
            out[pid] = raw.decode(errors="replace").split("\0")
        return out

    def close(self) -> None:
        """Kill every process inside the namespaces, then delete them (and so the veth pair)."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for proc, log in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            log.close()
        self._procs.clear()
        for ns in self._made:
            _ip("netns", "del", ns, check=False)
        self._made.clear()
