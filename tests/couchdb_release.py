"""A real Apache CouchDB 3.5 for the tests, started from the release by ``start-couchdb``.

``start-couchdb`` (``../shared/couchdb/start-couchdb`` beside a CI clone; see the
README there) unpacks the release once, writes a node's config into a data
directory, starts the node on 127.0.0.1 and prints its PID.  This module wraps it:
:class:`CouchDBRelease` is one node (start, stop with a signal, kill, restart on
the same data), :class:`CouchDBCluster` is three of them joined into a cluster
with an ``epmd`` of their own.  Both are used by ``tests/conftest.py`` (with
``COUCHTOKEN_TEST_COUCHDB_START``) and by cluster tests.

Processes are identified by PID *and* start time (``/proc/PID/stat``), so a PID
the kernel reused is never signalled; a zombie counts as stopped.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from couchtoken.dev.pouchdb import CouchAdmin, free_port

START_ENV = "COUCHTOKEN_TEST_COUCHDB_START"
STOP_TIMEOUT = 30.0  # seconds SIGTERM gets before SIGKILL
SYSTEM_DBS = ("_users", "_replicator")


def free_ports(count: int, avoid: Iterable[int] = ()) -> list[int]:
    """``count`` distinct loopback TCP ports that are free right now (none of ``avoid``)."""
    taken = set(avoid)
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in taken:
            taken.add(port)
            ports.append(port)
    return ports


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if gone or a zombie.

    Where ``/proc`` is missing (not Linux) this is 0 for a process that exists.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of stat(5)


class _Process:
    """A process this test session did not fork (it is reparented), known by PID and start time."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._started = _start_time(pid)

    @property
    def alive(self) -> bool:
        started = _start_time(self.pid)
        return started is not None and started == self._started

    def send(self, signum: int) -> None:
        if self.alive:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        """Wait until it has exited; False if it still runs after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.alive:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """Send ``signum``, wait for the exit, SIGKILL after ``timeout`` seconds."""
        self.send(signum)
        if not self.wait(timeout):
            self.send(signal.SIGKILL)
            if not self.wait(10):
                raise RuntimeError(f"process {self.pid} survived SIGKILL")


class CouchDBRelease:
    """One CouchDB node started by ``start-couchdb`` in ``datadir``, on 127.0.0.1:``port``.

    Without ``node_name`` a single node (``single_node = true``, Erlang
    distribution on ``dist_port``, no epmd); with it a cluster node named
    ``node_name@127.0.0.1`` that registers with the epmd on ``epmd_port`` (and
    starts that epmd if none runs there).  ``start`` after ``stop`` is the same
    node with the same data, port and password.
    """

    def __init__(
        self,
        start_script: Path | str,
        datadir: Path | str,
        port: int | None = None,
        admin: str = "admin",
        password: str | None = None,
        node_name: str | None = None,
        *,
        dist_port: int | None = None,
        epmd_port: int | None = None,
        cookie: str | None = None,
    ) -> None:
        self.start_script = Path(start_script).expanduser().resolve()
        self.datadir = Path(datadir)
        self.port = port or free_port()
        self.admin = admin
        self.password = password or secrets.token_urlsafe(16)
        self.node_name = node_name
        self.dist_port = dist_port if dist_port or node_name else free_ports(1, avoid=[self.port])[0]
        self.epmd_port = epmd_port
        self.cookie = cookie
        self._process: _Process | None = None

    @property
    def url(self) -> str:
        """The admin URL, credentials included."""
        creds = f"{quote(self.admin, safe='')}:{quote(self.password, safe='')}"
        return f"http://{creds}@127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def node(self) -> str:
        """The Erlang node name (what ``/_membership`` lists)."""
        return f"{self.node_name or f'couchdb_{self.port}'}@127.0.0.1"

    @property
    def pid(self) -> int | None:
        """The node's PID (beam.smp) while it runs."""
        return self._process.pid if self._process is not None and self._process.alive else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def log_dir(self) -> Path:
        return self.datadir / "log"

    def client(self) -> CouchAdmin:
        return CouchAdmin(self.url)

    def start(self, timeout: float = 180) -> int:
        """Start the node (or start it again on the same data), wait until it answers; its PID.

        The first start of all may take a few seconds more: it unpacks the release.
        """
        if not self.start_script.is_file():
            raise RuntimeError(f"{START_ENV}: {self.start_script} is not a file")
        if self.running:
            raise RuntimeError(f"CouchDB {self.node} already runs (pid {self.pid})")
        self.datadir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        for name in ("DIST_PORT", "ERL_EPMD_PORT", "COUCHDB_COOKIE"):
            env.pop(name, None)
        if self.dist_port is not None:
            env["DIST_PORT"] = str(self.dist_port)
        if self.epmd_port is not None:
            env["ERL_EPMD_PORT"] = str(self.epmd_port)
        if self.cookie is not None:
            env["COUCHDB_COOKIE"] = self.cookie
        argv = ["bash", str(self.start_script), str(self.datadir), str(self.port), self.admin, self.password]
        if self.node_name:
            argv.append(self.node_name)
        try:
            done = subprocess.run(
                argv,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                # A session of its own: a terminal's Ctrl-C reaches the tests, which stop
                # the node cleanly, rather than the node itself (its +Bd would end it at once).
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{self.start_script} did not finish in {timeout} s") from exc
        lines = done.stdout.split()
        if done.returncode != 0 or not lines or not lines[-1].isdigit():
            raise RuntimeError(
                f"{self.start_script} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
                f"\n(logs in {self.log_dir})"
            )
        self._process = _Process(int(lines[-1]))
        return self._process.pid

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """Send ``signum`` (SIGTERM: a clean stop), wait for the exit; SIGKILL after ``timeout`` s."""
        if self._process is not None:
            self._process.stop(signum, timeout)
        self._forget()

    def kill(self) -> None:
        """Stop abruptly, like a crash."""
        self.stop(signal.SIGKILL)

    def restart(self, downtime: float = 0.0) -> None:
        """Stop cleanly, stay down ``downtime`` seconds, start again: same data, port and password."""
        self.stop()
        time.sleep(downtime)
        self.start()

    def _forget(self) -> None:
        self._process = None
        # The script refuses to start while couchdb.pid names a live process; a zombie
        # (not reaped yet by whoever adopted it) would count as live to it.
        (self.datadir / "couchdb.pid").unlink(missing_ok=True)

    def set_config(self, section: str, key: str, value: str) -> None:
        """Set a config value through the API (CouchDB writes it to the node's local.ini)."""
        path = f"/_node/_local/_config/{quote(section, safe='')}/{quote(key, safe='')}"
        self.client().json("PUT", path, json.dumps(value).encode())

    def create_dbs(self, names: Sequence[str] = SYSTEM_DBS, timeout: float = 30) -> None:
        """Create databases that may exist already, or be being created.

        A single node creates its system databases itself just after it starts:
        a PUT racing it may answer 500 ``conflict``; then the database is there soon.
        """
        client = self.client()
        for name in names:
            path = f"/{quote(name, safe='')}"
            deadline = time.monotonic() + timeout
            while True:
                status, _, raw = client.request("PUT", path)
                if status in (201, 202, 412) or client.request("GET", path)[0] == 200:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PUT {path} -> {status} {raw[:200]!r}")
                time.sleep(0.2)

    def setup_for_tests(self) -> None:
        """What the tests want of a node: no login lockout, the system databases.

        ``[chttpd_auth_lockout] mode = warn``: tests that try wrong passwords never
        lock the suite's admin out.  A single node gets ``[cluster] n = 1`` too (no
        warnings about missing replicas).  Kept in local.ini, so a restart keeps them.
        """
        self.set_config("chttpd_auth_lockout", "mode", "warn")
        if self.node_name is None:
            self.set_config("cluster", "n", "1")
            self.create_dbs()


def _epmd_pids() -> set[int]:
    """PIDs of running ``epmd`` processes (of any user we can see)."""
    done = subprocess.run(["pgrep", "-x", "epmd"], capture_output=True, text=True)
    return {int(p) for p in done.stdout.split()}


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


class CouchDBCluster:
    """Nodes joined into one cluster, on loopback ports, with an epmd of their own.

    ``nodes[0]`` is the node the others were joined through.  The epmd listens on
    a free port of its own (``ERL_EPMD_PORT``), so several clusters (or other
    Erlang programs) on one machine do not meet; :meth:`stop` stops it too, and
    only that one.
    """

    def __init__(
        self,
        start_script: Path | str,
        basedir: Path | str,
        size: int = 3,
        admin: str = "admin",
        password: str | None = None,
    ) -> None:
        basedir = Path(basedir)
        password = password or secrets.token_urlsafe(16)
        *ports, self.epmd_port = free_ports(size + 1)
        cookie = secrets.token_hex(16)
        self.nodes = [
            CouchDBRelease(
                start_script,
                basedir / f"node{i}",
                port,
                admin,
                password,
                # Unique per machine, should another cluster share an epmd after all.
                node_name=f"node{i}-{port}",
                epmd_port=self.epmd_port,
                cookie=cookie,
            )
            for i, port in enumerate(ports, start=1)
        ]
        self.epmd_pid: int | None = None
        self._epmd: _Process | None = None

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 60) -> None:
        """Start every node, join them through the first, create the system databases."""
        before = _epmd_pids()
        try:
            for node in self.nodes:
                node.start()
                if self._epmd is None:
                    self._find_epmd(before)
            first = self.nodes[0]
            for node in self.nodes:
                node.set_config("chttpd_auth_lockout", "mode", "warn")
            for node in self.nodes[1:]:
                first.client().json("PUT", f"/_node/_local/_nodes/{quote(node.node, safe='@')}", {})
            self.wait_joined(timeout)
            first.create_dbs((*SYSTEM_DBS, "_global_changes"))
        except BaseException:
            self.stop()
            raise

    def _find_epmd(self, before: set[int]) -> None:
        for pid in sorted(_epmd_pids() - before):
            if _environ(pid).get("ERL_EPMD_PORT") == str(self.epmd_port):
                self.epmd_pid = pid
                self._epmd = _Process(pid)
                return

    def membership(self, node: CouchDBRelease) -> dict[str, Any]:
        return node.client().json("GET", "/_membership")

    def wait_joined(self, timeout: float = 60) -> None:
        """Wait until every node lists every node as a connected cluster member."""
        want = sorted(node.node for node in self.nodes)
        deadline = time.monotonic() + timeout
        while True:
            seen = [self.membership(node) for node in self.nodes]
            if all(sorted(m["cluster_nodes"]) == want and sorted(m["all_nodes"]) == want for m in seen):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not form in {timeout} s: {seen}")
            time.sleep(0.2)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every node (``signum``, SIGKILL after 30 s), then the epmd they started."""
        errors: list[BaseException] = []
        for node in self.nodes:  # all at once: a clean stop takes each node about a second
            if node.pid is not None:
                os.kill(node.pid, signum)
        for node in self.nodes:
            try:
                node.stop(signum)
            except Exception as exc:  # noqa: BLE001 - stop the others all the same
                errors.append(exc)
        if self._epmd is not None:
            self._epmd.stop(signal.SIGTERM, timeout=5)
            self._epmd = None
            self.epmd_pid = None
        if errors:
            raise errors[0]


def start_cluster(
    start_script: Path | str, basedir: Path | str, size: int = 3, admin: str = "admin"
) -> CouchDBCluster:
    """Start and join a ``size``-node cluster in ``basedir`` (a random admin password)."""
    cluster = CouchDBCluster(start_script, basedir, size, admin)
    cluster.start()
    return cluster
