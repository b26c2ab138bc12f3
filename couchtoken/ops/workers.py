"""``--workers N``: a small supervisor that opens the ports and keeps N worker processes on them.

The supervisor opens the public port itself (``couchtoken.ops.sockets``:
one SO_REUSEPORT socket per worker, or one shared socket for ``systemd:``
and ``unix:``) and never accepts on it; the workers inherit the sockets and
accept on them.  Each worker also gets a private listening unix socket
that the supervisor scrapes for ``/_metrics`` and ``/_health``
(``couchtoken.ops.gather``).  A worker that dies is replaced, with backoff
when it keeps dying; the port accepts meanwhile (the supervisor holds it
open), and the other workers serve.  SIGTERM closes the supervisor's
ports, asks every worker to drain and waits for them all.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from couchtoken.ops.gather import Fleet, FleetOpsApp
from couchtoken.ops.lifecycle import ExitCleanlyOnSigterm, ListeningPort
from couchtoken.ops.settings import Settings
from couchtoken.ops.sockets import PublicSockets
from couchtoken.ops.worker import FIRST_INHERITED_FD, Assignment

PLUGIN = "couchtoken"
STABLE_AFTER = 10.0  # seconds: a worker that ran this long is restarted at once
SPARE_AFTER = 2.0  # seconds after the spare took a slot before the next spare starts
STOP_GRACE = 5.0  # seconds past --drain-timeout before a worker that has not exited is killed
RESTART_BACKOFF = backoffPolicy(
    initialDelay=0.1, maxDelay=30.0, factor=2.0, jitter=lambda: random.uniform(0, 0.1)
)
_SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

_log = Logger()


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask), which ``--workers auto`` starts."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def twist_arguments(plugin_arguments: Sequence[str], argv: Sequence[str] | None = None) -> list[str]:
    """The ``twist`` runner's own options this process was started with (log format, log file...).

    Workers get them too, so they log the same way to the same place.  Found
    by cutting ``couchtoken <plugin arguments>`` off the end of ``argv``;
    empty when this process was not started by ``twist`` (a test, ``twistd``).
    """
    argv = list(sys.argv if argv is None else argv)
    cut = len(argv) - len(plugin_arguments) - 1
    started_by_twist = bool(argv) and (
        os.path.basename(argv[0]) == "twist" or argv[0].endswith(os.path.join("twisted", "__main__.py"))
    )
    if started_by_twist and cut >= 1 and argv[cut] == PLUGIN and argv[cut + 1 :] == list(plugin_arguments):
        return argv[1:cut]
    return []


def worker_command(plugin_arguments: Sequence[str], count: int, runner: Sequence[str]) -> list[str]:
    """``twist <runner options> couchtoken <options> --workers N --worker``, SIGINT ignored from the start."""
    return [
        sys.executable,
        "-m",
        "couchtoken.ops.twist_worker",
        *runner,
        PLUGIN,
        *plugin_arguments,
        "--workers",
        str(count),
        "--worker",
    ]


def worker_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, less systemd's socket variables (the workers get sockets as fds)."""
    environ = dict(os.environ if environ is None else environ)
    for name in _SYSTEMD_VARIABLES:
        environ.pop(name, None)
    return environ


def describe_end(reason: Failure) -> str:
    """``exited with status 3`` or ``was killed by signal 9``, from processEnded's reason."""
    signal_number = getattr(reason.value, "signal", None)
    if signal_number is not None:
        return f"was killed by signal {signal_number}"
    return f"exited with status {getattr(reason.value, 'exitCode', None)}"


@attrs.define(eq=False)
class WorkerSlot:
    """One of the N places a worker runs in; its process changes when it is restarted."""

    index: int
    ops_socket: socket.socket  # listening; the supervisor holds it, the worker accepts on it
    ops_path: str
    process: Any = None  # the IProcessTransport while a worker runs here
    pid: int | None = None  # while a worker runs here
    started_at: float = 0.0
    restarts: int = 0
    crashes_in_a_row: int = 0
    restart_call: Any = None


class _ChildProtocol(ProcessProtocol):
    """A worker process: a spare until it is given a slot."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.slot: WorkerSlot | None = None

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.child_ended(self, reason)


class Supervisor(Service):
    """Starts ``count`` workers once the public port is open, restarts them, drains them on stop.

    Besides the N workers, one spare process runs: started like a worker,
    its imports done, it waits for a slot.  A worker that dies is replaced
    by the spare at once (a cold start of Python takes a second or more on
    a busy machine), and a new spare is started behind it.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        command: list[str],
        *,
        drain_timeout: float,
        environ: dict[str, str] | None = None,
        clock: Any = None,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self._reactor = reactor
        self._clock = reactor if clock is None else clock
        self.count = count
        self._command = command
        self._environ = worker_environment(environ)
        self._drain_timeout = drain_timeout
        self._stop_grace = stop_grace
        self._public_fds: list[int] | None = None
        self._directory: str | None = None
        self._stopped: Deferred[None] | None = None
        self._kill_call: Any = None
        self._spare: _ChildProtocol | None = None
        self._spare_crashes = 0
        self._spare_started = 0.0
        self._spare_call: Any = None
        self.slots: list[WorkerSlot] = []
        self.on_ended: Callable[[WorkerSlot], None] = lambda slot: None

    def ports_ready(self, public_fds: list[int]) -> None:
        """The public port is open: ``public_fds[i]`` is the listening socket worker ``i`` accepts on."""
        self._public_fds = public_fds
        if self.running:
            self._start_all()

    def startService(self) -> None:
        super().startService()
        if self._public_fds is not None:
            self._start_all()

    def _start_all(self) -> None:
        if self.slots:
            return
        self._directory = tempfile.mkdtemp(
            prefix="couchtoken-workers-", dir=os.environ.get("RUNTIME_DIRECTORY") or None
        )
        _log.info("Starting {count} workers", count=self.count)
        for index in range(self.count):
            path = os.path.join(self._directory, f"worker-{index}.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(64)
            listener.setblocking(False)
            self.slots.append(WorkerSlot(index, listener, path))
        for slot in self.slots:
            self._give(self._spawn(), slot)
        self._spawn_spare()

    def _child_fds(self) -> tuple[dict[int, Any], list[int], list[int]]:
        """The fds every child inherits, and where the public and the ops sockets land in it."""
        assert self._public_fds is not None
        distinct = list(dict.fromkeys(self._public_fds))
        public = [FIRST_INHERITED_FD + distinct.index(fd) for fd in self._public_fds]
        ops = [FIRST_INHERITED_FD + len(distinct) + slot.index for slot in self.slots]
        fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for index, fd in enumerate(distinct):
            fds[FIRST_INHERITED_FD + index] = fd
        for slot, child_fd in zip(self.slots, ops, strict=True):
            fds[child_fd] = slot.ops_socket.fileno()
        return fds, public, ops

    def _spawn(self) -> _ChildProtocol:
        child = _ChildProtocol(self)
        fds, _, _ = self._child_fds()
        self._reactor.spawnProcess(child, self._command[0], self._command, env=self._environ, childFDs=fds)
        return child

    def _spawn_spare(self) -> None:
        self._spare_call = None
        if self._stopped is None:
            self._spare = self._spawn()
            self._spare_started = self._clock.seconds()

    def _give(self, child: _ChildProtocol, slot: WorkerSlot) -> None:
        """Put ``child`` to work in ``slot``: tell it which sockets are its own."""
        fds, public, ops = self._child_fds()
        assignment = Assignment(
            slot.index,
            public[slot.index],
            ops[slot.index],
            tuple(fd for fd in fds if fd >= FIRST_INHERITED_FD),
        )
        child.slot = slot
        slot.restart_call = None
        slot.process = child.transport
        slot.pid = child.transport.pid
        slot.started_at = self._clock.seconds()
        child.transport.write(assignment.encode())
        _log.info("Worker {worker} started (pid {pid})", worker=slot.index, pid=slot.pid)

    def _restart(self, slot: WorkerSlot) -> None:
        spare, self._spare = self._spare, None
        self._give(spare or self._spawn(), slot)
        if spare is not None:
            # A new spare's imports would take CPU from the worker starting now: it can wait.
            self._spare_call = self._clock.callLater(SPARE_AFTER, self._spawn_spare)

    def child_ended(self, child: _ChildProtocol, reason: Failure) -> None:
        """A worker or the spare ended: replace it (unless stopping), with backoff if it keeps ending."""
        how = describe_end(reason)
        slot = child.slot
        if slot is None:  # the spare
            if child is self._spare:
                self._spare = None
            if self._stopped is not None:
                self._finish_if_all_ended()
                return
            if self._clock.seconds() - self._spare_started >= STABLE_AFTER:
                self._spare_crashes = 0
            delay = RESTART_BACKOFF(self._spare_crashes)
            self._spare_crashes += 1
            _log.warn("The spare worker {how}; starting another in {delay:.1f} s", how=how, delay=delay)
            self._spare_call = self._clock.callLater(delay, self._spawn_spare)
            return
        pid, slot.process, slot.pid = slot.pid, None, None
        self.on_ended(slot)
        if self._stopped is not None:
            _log.info("Worker {worker} (pid {pid}) {how}", worker=slot.index, pid=pid, how=how)
            self._finish_if_all_ended()
            return
        if self._clock.seconds() - slot.started_at >= STABLE_AFTER:
            slot.crashes_in_a_row = 0
        # The first end is replaced at once; a worker that keeps ending waits longer each time.
        delay = RESTART_BACKOFF(slot.crashes_in_a_row - 1) if slot.crashes_in_a_row else 0.0
        slot.crashes_in_a_row += 1
        slot.restarts += 1
        _log.warn(
            "Worker {worker} (pid {pid}) {how}; starting it again in {delay:.1f} s",
            worker=slot.index,
            pid=pid,
            how=how,
            delay=delay,
        )
        slot.restart_call = self._clock.callLater(delay, self._restart, slot)

    def running_slots(self) -> list[WorkerSlot]:
        return [slot for slot in self.slots if slot.process is not None]

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._stopped is not None:
            return self._stopped
        self._stopped = Deferred()
        for call in [slot.restart_call for slot in self.slots] + [self._spare_call]:
            if call is not None and call.active():
                call.cancel()
        if self._spare is not None:
            self._signal([self._spare.transport], "TERM")  # it serves nothing; it may not be listening yet
        running = self.running_slots()
        if running:
            _log.info(
                "Stopping {count} workers: running downloads get up to {timeout} s to finish",
                count=len(running),
                timeout=self._drain_timeout,
            )
            self._signal([slot.process for slot in running], "TERM")
        self._kill_call = self._clock.callLater(self._drain_timeout + self._stop_grace, self._kill_stragglers)
        stopped = self._stopped
        self._finish_if_all_ended()
        return stopped

    def _signal(self, processes: list[Any], name: str) -> None:
        for process in processes:
            try:
                process.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def _kill_stragglers(self) -> None:
        self._kill_call = None
        running = [slot.process for slot in self.running_slots()]
        if self._spare is not None:
            running.append(self._spare.transport)
        _log.error("{count} workers did not stop in time; killing them", count=len(running))
        self._signal(running, "KILL")

    def _finish_if_all_ended(self) -> None:
        if self._stopped is None or self._stopped.called or self.running_slots() or self._spare is not None:
            return
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        for slot in self.slots:
            slot.ops_socket.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
        if self.slots:
            _log.info("All workers stopped")
        self._stopped.callback(None)


def make_supervisor_service(
    settings: Settings,
    port_description: str,
    count: int,
    plugin_arguments: Sequence[str],
    reactor: Any,
) -> MultiService:
    """The service tree of ``twist couchtoken --workers N`` (N > 1): ports, supervisor, metrics port."""
    service = MultiService()
    runner = twist_arguments(plugin_arguments)
    supervisor = Supervisor(
        reactor, count, worker_command(plugin_arguments, count, runner), drain_timeout=settings.drain_timeout
    )
    supervisor.setServiceParent(service)
    PublicSockets(reactor, port_description, count, supervisor.ports_ready).setServiceParent(service)
    if settings.metrics_port:
        site = Site(FleetOpsApp(Fleet(supervisor, reactor)).resource(), reactor=reactor)
        site.log = lambda request: None  # polled every few seconds: not worth a log line
        endpoint = serverFromString(reactor, settings.metrics_port)
        ListeningPort(endpoint, site, reactor, settings.metrics_port).setServiceParent(service)
    else:
        _log.warn(
            "With --workers, /_metrics is served only on --metrics-port (summed over the workers); "
            "the public port has none"
        )
    ExitCleanlyOnSigterm(reactor).setServiceParent(service)
    return service
