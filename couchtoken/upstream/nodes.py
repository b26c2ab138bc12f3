"""The nodes of a CouchDB cluster: which one to ask, failing over and coming back.

Requests go to the first node, in the configured order, that is not known
to be down.  A node that refuses, resets or times out before answering is
marked down and the request moves on to the next node; a down node is asked
``GET /_up`` in the background (with backoff) and, once it answers, it is
preferred again.  When every node is down, they are all tried anyway, in
order: a node may be back before its recheck says so.

With a single node there is nothing to fail over to: it is never marked down.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from couchtoken.upstream.server import CouchDBCluster, CouchDBServer

_log = Logger()

Probe = Callable[[CouchDBServer], Awaitable[str | None]]


@attrs.define(eq=False)
class Node:
    """One node and what is known of it."""

    server: CouchDBServer
    up: bool = True
    rechecks: int = 0
    recheck_call: Any = None
    checking: Deferred | None = None

    def __repr__(self) -> str:
        return repr(self.server)


class NodeSet:
    """Orders the nodes for each request and keeps their up/down state."""

    def __init__(
        self,
        cluster: CouchDBCluster,
        clock: Any,
        *,
        policy: Callable[[int], float] | None = None,
    ) -> None:
        self.nodes = [Node(server) for server in cluster.nodes]
        self._clock = clock
        self._policy = policy or backoffPolicy(initialDelay=0.5, maxDelay=10.0, factor=2.0)
        self.probe: Probe | None = None  # set by the client: asks one node GET /_up
        self.failovers = 0

    def candidates(self) -> list[Node]:
        """The nodes to try, in order: those up first, then those down."""
        return [n for n in self.nodes if n.up] + [n for n in self.nodes if not n.up]

    def failed(self, node: Node, detail: str) -> None:
        """``node`` did not answer: prefer the others until it does again."""
        if len(self.nodes) < 2 or not node.up:
            return
        node.up = False
        self.failovers += 1
        _log.warn("CouchDB node {node} failed ({detail}); using the other nodes", node=node, detail=detail)
        self._schedule_recheck(node)

    def answered(self, node: Node) -> None:
        """``node`` answered a request."""
        if node.up:
            return
        node.up = True
        node.rechecks = 0
        if node.recheck_call is not None and node.recheck_call.active():
            node.recheck_call.cancel()
        node.recheck_call = None
        _log.info("CouchDB node {node} answers again", node=node)

    def _schedule_recheck(self, node: Node) -> None:
        if node.recheck_call is not None and node.recheck_call.active():
            return
        delay = self._policy(node.rechecks)
        node.rechecks += 1
        node.recheck_call = self._clock.callLater(delay, self._recheck, node)

    def _recheck(self, node: Node) -> None:
        node.recheck_call = None
        if node.up or self.probe is None:
            return
        node.checking = Deferred.fromCoroutine(self._ask(node))
        node.checking.addErrback(lambda failure: failure.trap(CancelledError))

    async def _ask(self, node: Node) -> None:
        assert self.probe is not None
        problem = await self.probe(node.server)
        node.checking = None
        if problem is None:
            self.answered(node)
        elif not node.up:
            self._schedule_recheck(node)

    def states(self) -> list[dict[str, str]]:
        """Each node (credentials masked) and whether it is up, for ``/_health``."""
        return [{"node": repr(n.server), "state": "up" if n.up else "down"} for n in self.nodes]

    def stop(self) -> None:
        """Cancel the background rechecks."""
        for node in self.nodes:
            if node.recheck_call is not None and node.recheck_call.active():
                node.recheck_call.cancel()
            node.recheck_call = None
            if node.checking is not None:
                node.checking.cancel()
