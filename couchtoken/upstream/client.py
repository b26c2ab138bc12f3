"""The only way couchtoken talks to CouchDB: a few GETs, nothing else.

``fetch_document`` reads ``GET /<db>/<docid>?att_encoding_info=true`` (a
document nested too deeply for Python's JSON parser reads as an empty one,
and is logged once); ``open_attachment`` starts
``GET /<db>/<docid>/<attachment>?rev=<rev>`` and hands back the unread
response so its body can be streamed; ``open_changes`` starts a database's
continuous ``_changes`` feed; ``latest_change`` reads a database's latest change for
the feeds' database checks; ``probe`` asks ``GET /_up`` for health checks.
Every request goes to the first node of the cluster that answers (see
``couchtoken.upstream.nodes``).

A plain ``Agent`` is used rather than ``treq.HTTPClient``, which always adds
gzip decoding (and a cookie jar and redirects): attachment bytes must reach
the client exactly as CouchDB sent them.  treq's body helpers are used to read what is buffered.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from cachetools import TTLCache
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from couchtoken import __version__
from couchtoken.access.names import AttachmentPath, attachment_path, document_path, encode_segment
from couchtoken.upstream.nodes import NodeSet
from couchtoken.upstream.server import CouchDBCluster, CouchDBServer, as_cluster
from couchtoken.upstream.slots import ConnectionSlots, QueueTimeout, Release

_log = Logger()

DOCUMENT_QUERY = "att_encoding_info=true"
LATEST_CHANGE_QUERY = "descending=true&limit=1"
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
REPORT_AGAIN_AFTER = 3600.0  # seconds before the same unreadable document is logged again
MAX_ERROR_BODY_BYTES = 64 * 1024
_USER_AGENT = f"couchtoken/{__version__}".encode("ascii")


class UpstreamError(Exception):
    """CouchDB could not be reached, or answered something unusable (502)."""

    status = 502

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class UpstreamTimeout(UpstreamError):
    """CouchDB did not connect or answer in time (504)."""

    status = 504


class _BodyTooLarge(Exception):
    pass


class _TooDeep(UpstreamError):
    """JSON nested deeper than Python's parser can read (CouchDB stores such documents)."""

    def __init__(self) -> None:
        super().__init__("garbage", "CouchDB sent JSON nested too deeply to read")


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory, without a log line per upstream connection."""

    noisy = False


def _translate(failure_value: BaseException) -> UpstreamError:
    """Map a Twisted client error to an UpstreamError with a safe message."""
    if isinstance(failure_value, UpstreamError):
        return failure_value
    if isinstance(failure_value, error.TimeoutError):
        return UpstreamTimeout("connect_timeout", "connecting to CouchDB timed out")
    if isinstance(failure_value, error.ConnectError):
        return UpstreamError("connect", f"cannot connect to CouchDB ({type(failure_value).__name__})")
    if isinstance(failure_value, ResponseFailed):
        reasons = ", ".join(sorted({type(r.value).__name__ for r in failure_value.reasons}))
        return UpstreamError("protocol", f"CouchDB's response failed ({reasons})")
    if isinstance(failure_value, _BodyTooLarge):
        return UpstreamError("too_large", "CouchDB's document is too large")
    reasons = getattr(failure_value, "reasons", None)
    if reasons:  # ResponseNeverReceived, RequestTransmissionFailed
        names = ", ".join(sorted({type(r.value).__name__ for r in reasons}))
        return UpstreamError("protocol", f"CouchDB did not answer ({names})")
    return UpstreamError("protocol", f"CouchDB request failed ({type(failure_value).__name__})")


async def read_limited(response: IResponse, limit: int) -> bytes:
    """Read a whole response body, refusing more than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise _BodyTooLarge()
        chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)


class CouchDBClient:
    """GETs documents, attachments and feeds from a CouchDB node or cluster, failing over between nodes.

    A request that gets no answer from a node (refused, reset, timed out
    before the response headers) is tried on the next node; once a response
    has started, it is that node's.
    """

    def __init__(
        self,
        cluster: CouchDBCluster | CouchDBServer,
        reactor: Any,
        *,
        connect_timeout: float,
        response_timeout: float,
        max_connections: int,
    ) -> None:
        self.nodes = NodeSet(as_cluster(cluster), reactor)
        self.nodes.probe = self._probe_node
        self._reactor = reactor
        self._response_timeout = response_timeout
        # Documents, attachments and database checks: at most max_connections at once, over
        # as many pooled connections (per node; the bound is overall).
        self.slots = ConnectionSlots(max_connections, reactor, response_timeout)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_connections
        self.pool.cachedConnectionTimeout = 30
        self.pool._factory = _QuietClientFactory  # a documented, if private, ivar
        self._agent = Agent(reactor, connectTimeout=connect_timeout, pool=self.pool)
        # Feeds hold their connection for as long as they live, and health checks must not wait
        # behind downloads: keep both out of the pool (and of the bound).
        feed_pool = HTTPConnectionPool(reactor, persistent=False)
        feed_pool._factory = _QuietClientFactory
        self._feed_agent = Agent(reactor, connectTimeout=connect_timeout, pool=feed_pool)
        self._health_path = "/_up"
        self._reported: TTLCache[tuple[str, str], bool] = TTLCache(
            maxsize=1000, ttl=REPORT_AGAIN_AFTER, timer=reactor.seconds
        )
        self._has_up: bool | None = None  # whether the server answers GET /_up (learnt by a health check)

    def __repr__(self) -> str:
        return f"CouchDBClient({', '.join(repr(n) for n in self.nodes.nodes)})"

    def _headers(self, server: CouchDBServer, **extra: bytes) -> Headers:
        headers = Headers({b"user-agent": [_USER_AGENT]})
        if server.authorization is not None:
            headers.setRawHeaders(b"authorization", [server.authorization])
        for name, value in extra.items():
            headers.setRawHeaders(name.replace("_", "-").encode("ascii"), [value])
        return headers

    def _with_timeout(self, d: Deferred, what: str, timeout: float | None = None) -> Deferred:
        def timed_out(result: object, timeout: float) -> None:
            raise UpstreamTimeout("response_timeout", f"CouchDB did not answer {what} in {timeout:g}s")

        return d.addTimeout(timeout or self._response_timeout, self._reactor, onTimeoutCancel=timed_out)

    async def _get(self, url: bytes, headers: Headers, agent: Agent | None = None) -> IResponse:
        try:
            return await (agent or self._agent).request(b"GET", url, headers)
        except defer.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every client failure maps to 502/504
            raise _translate(exc) from None

    async def _request(
        self,
        path: str,
        query: str = "",
        *,
        what: str,
        timeout: float | None = None,
        agent: Agent | None = None,
        **extra: bytes,
    ) -> IResponse:
        """GET ``path?query`` from the first node that answers; the body is left unread."""
        failure: UpstreamError | None = None
        for node in self.nodes.candidates():
            url = _url(node.server, path, query)
            d = Deferred.fromCoroutine(self._get(url, self._headers(node.server, **extra), agent))
            try:
                response = await self._with_timeout(d, what, timeout)
            except UpstreamError as exc:  # no answer from this node: try the next
                self.nodes.failed(node, exc.detail)
                failure = exc
                continue
            self.nodes.answered(node)
            return response
        assert failure is not None
        raise failure

    async def _take_slot(self, timeout: float | None = None) -> Release:
        """Wait for one of the ``max_connections`` request slots (504 if none comes free in time)."""
        try:
            return await self.slots.acquire(timeout)
        except QueueTimeout:
            raise UpstreamTimeout("queue_timeout", "no connection to CouchDB came free in time") from None

    async def fetch_document(self, db: str, docid: str) -> dict[str, Any] | None:
        """The document's JSON, or None when the document or database is missing."""
        release = await self._take_slot()
        try:
            return await self._fetch_document(db, docid)
        finally:
            release()

    async def _fetch_document(self, db: str, docid: str) -> dict[str, Any] | None:
        # att_encoding_info: CouchDB keeps compressible types gzip-compressed; a HEAD
        # needs the encoded length to answer as the GET will.
        response = await self._request(
            document_path(db, docid), DOCUMENT_QUERY, what="a document request", accept=b"application/json"
        )
        if not await self._found(response):
            return None
        try:
            return await self._read_object(response, "document")
        except _TooDeep:
            self._report_unreadable(db, docid)
            return {}  # a document with nothing usable in it: it opens nothing (403)

    async def _found(self, response: IResponse) -> bool:
        """False for a 404 (the document or database is missing); raises for any status but 200."""
        if response.code == 404:
            await self.discard(response)
            return False
        if response.code != 200:
            await self.discard(response)
            raise _status_error(response.code)
        return True

    async def _read_object(self, response: IResponse, noun: str) -> dict[str, Any]:
        """The response's body as a JSON object (bounded in size and time)."""
        try:
            reading = Deferred.fromCoroutine(read_limited(response, MAX_DOCUMENT_BYTES))
            body = await self._with_timeout(reading, f"a whole {noun}")
        except defer.CancelledError:
            raise
        except UpstreamError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _translate(exc) from None
        try:
            found = json.loads(body)
        except RecursionError:
            # Valid JSON that CouchDB stores but Python's parser cannot read.
            raise _TooDeep() from None
        except ValueError:
            raise UpstreamError("garbage", f"CouchDB sent a {noun} that is not JSON") from None
        if not isinstance(found, dict):
            raise UpstreamError("garbage", f"CouchDB sent a {noun} that is not an object")
        return found

    async def latest_change(self, db: str, timeout: float) -> dict[str, Any] | None:
        """The database's latest ``_changes`` row (``{"last_seq": 0}`` when it has none); None if missing.

        ``GET /<db>/_changes?descending=true&limit=1``: the feeds' database check.
        """
        release = await self._take_slot(timeout)
        try:
            return await self._latest_change(db, timeout)
        finally:
            release()

    async def _latest_change(self, db: str, timeout: float) -> dict[str, Any] | None:
        response = await self._request(
            f"/{encode_segment(db)}/_changes",
            LATEST_CHANGE_QUERY,
            what="a database check",
            timeout=timeout,
            accept=b"application/json",
        )
        if not await self._found(response):
            return None
        found = await self._read_object(response, "changes answer")
        results = found.get("results")
        if isinstance(results, list) and results and isinstance(results[0], dict):
            return results[0]
        return {"last_seq": found.get("last_seq")}

    async def feeds_end_with_database(self) -> bool:
        """Whether the server ends a database's feeds when the database is deleted.

        Learnt from the health check, with no request of its own: Apache
        CouchDB 2 and later answer ``GET /_up`` and end those feeds; a server
        without ``/_up`` (PouchDB Server) is taken not to.  Raises
        UpstreamError while no node has answered yet.
        """
        if self._has_up is None:
            problem = await self.probe(self._response_timeout)
            if self._has_up is None:
                raise UpstreamError("connect", problem or "CouchDB did not answer")
        return self._has_up

    def _report_unreadable(self, db: str, docid: str) -> None:
        """One warning per document (and per hour at most), not one per request."""
        if (db, docid) in self._reported:
            return
        self._reported[db, docid] = True
        _log.warn(
            "CouchDB document {db}/{docid} is nested too deeply to read; it opens nothing",
            db=db,
            docid=docid,
        )

    async def open_attachment(
        self,
        target: AttachmentPath,
        rev: str | None,
        *,
        byte_range: tuple[int, int] | None = None,
        accept_gzip: bool = False,
    ) -> tuple[IResponse, Release]:
        """Start the attachment GET (pinned to ``rev``); the body is left unread.

        The caller holds a request slot until it calls the returned release,
        once the body has been relayed whole or dropped.
        """
        extra: dict[str, bytes] = {}
        if byte_range is not None:
            start, stop = byte_range
            extra["range"] = b"bytes=%d-%d" % (start, stop - 1)
        if accept_gzip:
            extra["accept_encoding"] = b"gzip"
        query = "rev=" + encode_segment(rev) if rev else ""
        release = await self._take_slot()
        try:
            response = await self._request(
                attachment_path(target), query, what="an attachment request", **extra
            )
        except BaseException:
            release()
            raise
        return response, release

    async def open_changes(self, db: str, heartbeat: float, timeout: float) -> IResponse:
        """Start ``GET /<db>/_changes?feed=continuous&heartbeat=..&since=now``; the body streams on."""
        query = f"feed=continuous&heartbeat={max(1, round(heartbeat * 1000))}&since=now"
        return await self._request(
            f"/{encode_segment(db)}/_changes",
            query,
            what="a changes feed request",
            timeout=timeout,
            agent=self._feed_agent,
            accept=b"application/json",
        )

    async def open_db_updates(self, heartbeat: float, timeout: float) -> IResponse:
        """Start ``GET /_db_updates?feed=continuous&heartbeat=..&since=now``; the body streams on."""
        query = f"feed=continuous&heartbeat={max(1, round(heartbeat * 1000))}&since=now"
        return await self._request(
            "/_db_updates",
            query,
            what="a _db_updates feed request",
            timeout=timeout,
            agent=self._feed_agent,
            accept=b"application/json",
        )

    async def database_update_seq(self, db: str) -> Any:
        """The database's ``update_seq`` (``GET /<db>``), or None when the database is missing."""
        release = await self._take_slot()
        try:
            response = await self._request(
                f"/{encode_segment(db)}", what="a database request", accept=b"application/json"
            )
            if not await self._found(response):
                return None
            return (await self._read_object(response, "database info")).get("update_seq")
        finally:
            release()

    async def changes_since(self, db: str, since: Any, limit: int) -> tuple[list[str], Any, bool] | None:
        """``GET /<db>/_changes?since=<since>&limit=<n>``: (changed ids, last_seq, more pending).

        None when the database is missing.
        """
        query = f"since={encode_segment(str(since))}&limit={limit}"
        release = await self._take_slot()
        try:
            response = await self._request(
                f"/{encode_segment(db)}/_changes", query, what="a changes request", accept=b"application/json"
            )
            if not await self._found(response):
                return None
            found = await self._read_object(response, "changes answer")
        finally:
            release()
        results = found.get("results")
        if not isinstance(results, list) or "last_seq" not in found:
            raise UpstreamError("garbage", "CouchDB sent a changes answer without results")
        docids = [row["id"] for row in results if isinstance(row, dict) and isinstance(row.get("id"), str)]
        pending = found.get("pending")
        more = isinstance(pending, int) and pending > 0 or (len(results) >= limit and "pending" not in found)
        return docids, found["last_seq"], more

    async def ping(self, timeout: float) -> bool:
        """Whether some node answers within ``timeout`` seconds."""
        return await self.probe(timeout) is None

    async def probe(self, timeout: float) -> str | None:
        """None when some node answers ``GET /_up`` with 200; else why none does.

        Every node is asked (at once), and what is learnt updates its up/down state.
        """
        asked = [Deferred.fromCoroutine(self._probe_node(node.server, timeout)) for node in self.nodes.nodes]
        problems = await gatherResults(asked)
        for node, problem in zip(self.nodes.nodes, problems, strict=True):
            if problem is None:
                self.nodes.answered(node)
            else:
                self.nodes.failed(node, problem)
        if any(problem is None for problem in problems):
            return None
        return "; ".join(sorted(set(problems)))

    async def _probe_node(self, server: CouchDBServer, timeout: float | None = None) -> str | None:
        """None when ``server`` answers ``GET /_up`` (``GET /`` where it has none) with 200; else why not."""
        path = self._health_path
        try:
            while True:
                headers = self._headers(server, accept=b"application/json")
                asked = self._get(_url(server, path), headers, self._feed_agent)
                response = await self._with_timeout(Deferred.fromCoroutine(asked), "a health check", timeout)
                await self.discard(response)
                if path == "/_up" and response.code == 200:
                    self._has_up = True
                if response.code != 404 or path == "/":
                    break
                path = self._health_path = "/"  # a server without /_up (PouchDB Server): ask / from now on
                self._has_up = False
        except UpstreamError as exc:
            return exc.detail
        if response.code != 200:
            return _status_error(response.code).detail
        return None

    async def discard(self, response: IResponse) -> None:
        """Read and drop a small body so the connection can be reused."""
        try:
            await read_limited(response, MAX_ERROR_BODY_BYTES)
        except Exception:  # noqa: BLE001 - the connection is simply not reused
            pass

    def close(self) -> Deferred:
        """Stop the node rechecks and close pooled connections (on service stop)."""
        self.nodes.stop()
        return self.pool.closeCachedConnections()


def _url(server: CouchDBServer, path: str, query: str = "") -> bytes:
    url = server.base_url + path
    if query:
        url += "?" + query
    return url.encode("ascii")


def _status_error(code: int) -> UpstreamError:
    if code in (401, 403):
        return UpstreamError("unauthorized", f"CouchDB refused the service's credentials ({code})")
    return UpstreamError("status", f"CouchDB answered {code}")
