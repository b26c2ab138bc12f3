"""The download route: check the token, then stream the attachment.

``GET|HEAD /<db>/<docid>/<attachment>?token=<t>``.  Every failure that could
tell an outsider something (wrong token, no token in the document, missing
document or database) gets the same 403; only a valid token learns that an
attachment is missing (404).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import UNKNOWN_LENGTH, IRequest, IResponse
from werkzeug.exceptions import NotFound
from werkzeug.http import parse_accept_header

from couchtoken.attachments import AttachmentInfo
from couchtoken.blobs import BlobCache, BlobKey
from couchtoken.cache import DocumentCache
from couchtoken.conditional import UNSATISFIABLE, choose_range, none_match
from couchtoken.couchdb import CouchDBClient, UpstreamError
from couchtoken.documents import DocumentSummary
from couchtoken.links import DEFAULT_MAX_LIFETIME, signature_matches
from couchtoken.metrics import Metrics
from couchtoken.names import AttachmentPath, BadPath, parse_download_path
from couchtoken.ops import HEALTH_PATH, METRICS_PATH, OpsEndpoints
from couchtoken.presentation import Presentation
from couchtoken.relay import relay_body
from couchtoken.throttle import GuessThrottle

ALLOWED_METHODS = b"GET, HEAD, OPTIONS"
ALLOWED_REQUEST_HEADERS = b"Range, If-None-Match, If-Range, Authorization, X-Download-Token"
EXPOSED_HEADERS = b"Content-Length, Content-Range, Content-Encoding, Content-Disposition, ETag, Accept-Ranges"

_COMMON_HEADERS = (
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", EXPOSED_HEADERS),
    (b"x-content-type-options", b"nosniff"),
)
_SUCCESS_HEADERS = (
    b"content-disposition",
    b"content-security-policy",
    b"etag",
    b"accept-ranges",
    b"vary",
    b"content-range",
    b"content-encoding",
    b"content-length",
    b"content-type",
    b"cache-control",
    b"retry-after",
)
_FORBIDDEN = {"error": "forbidden", "reason": "invalid or missing download token"}


class HTTPAnswer(Exception):
    """A finished answer (status and JSON body) raised from deep in a request."""

    def __init__(
        self, status: int, error: str, reason: str, *, guess: bool = False, **headers: bytes
    ) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.guess = guess  # a failed token check: counts towards guess throttling
        self.body = {"error": error, "reason": reason}
        self.headers = headers


@attrs.frozen
class Credential:
    """A token or a signed link: ``test`` says whether it opens a document; ``refusal`` says why not."""

    test: Callable[[DocumentSummary], bool]
    refusal: str


class _StaleRevision(Exception):
    """CouchDB has no such attachment at the revision the token was checked against."""


def _forbidden(guess: bool = False) -> HTTPAnswer:
    return HTTPAnswer(403, _FORBIDDEN["error"], _FORBIDDEN["reason"], guess=guess)


def _single_arg(request: IRequest, name: bytes) -> bytes | None:
    values = request.args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HTTPAnswer(400, "bad_request", f"'{name.decode()}' must be given once")
    return values[0]


def _offered_token(request: IRequest) -> bytes | None:
    """The token from ``?token=``, ``Authorization: Bearer`` or ``X-Download-Token``.

    Headers keep tokens out of URLs, browser history and Referer.  Different
    tokens in different places are refused rather than guessed between.
    """
    offered = set()
    query = _single_arg(request, b"token")
    if query:
        offered.add(query)
    for value in request.requestHeaders.getRawHeaders(b"authorization", []):
        scheme, _, credentials = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and credentials.strip():
            offered.add(credentials.strip())
    for value in request.requestHeaders.getRawHeaders(b"x-download-token", []):
        if value.strip():
            offered.add(value.strip())
    if len(offered) > 1:
        raise HTTPAnswer(400, "bad_request", "different tokens were given")
    return offered.pop() if offered else None


def _accepts_gzip(request: IRequest) -> bool:
    header = request.getHeader(b"accept-encoding")
    if not header:
        return False
    accept = parse_accept_header(header.decode("latin-1"))
    return accept["gzip"] > 0


class DownloadApp:
    """Klein routes of the public download port."""

    app = Klein()
    # Keep "//" and friends away from werkzeug's redirecting slash merge:
    # malformed paths must get a 400, not a redirect.
    app.url_map.merge_slashes = False

    def __init__(
        self,
        couchdb: CouchDBClient,
        documents: DocumentCache,
        *,
        ops: OpsEndpoints,
        metrics: Metrics,
        clock: Any,
        max_downloads: int,
        idle_timeout: float,
        upstream_timeout: float = 30.0,
        blobs: BlobCache | None = None,
        serve_metrics: bool = True,
        presentation: Presentation | None = None,
        databases: tuple[str, ...] = (),
        max_link_lifetime: float = DEFAULT_MAX_LIFETIME,
        throttle: GuessThrottle | None = None,
    ) -> None:
        self._couchdb = couchdb
        self._blobs = blobs or BlobCache(0, 0)
        self._documents = documents
        self._ops = ops
        self._metrics = metrics
        self._clock = clock
        self._max_downloads = max_downloads
        self._idle_timeout = idle_timeout
        self._upstream_timeout = upstream_timeout
        self._serve_metrics = serve_metrics
        self._presentation = presentation or Presentation()
        self._databases = databases
        self._max_link_lifetime = max_link_lifetime
        self._throttle = throttle or GuessThrottle(clock, 0)
        self._active: set[IRequest] = set()
        self._drained: Deferred[None] | None = None
        self._closing: list[Any] = []  # transports flushing their last bytes while draining
        self._closing: list[Any] = []  # transports flushing their last bytes while draining
        self._log = Logger()
        metrics.in_flight.set_function(lambda: len(self._active))

    def resource(self) -> Any:
        return self.app.resource()

    @app.handle_errors(NotFound)
    def _unroutable(self, request: IRequest, failure: Any) -> bytes:
        return self._answer(request, HTTPAnswer(400, "bad_request", "malformed path"))

    @app.route("/", branch=True, strict_slashes=False)
    async def download(self, request: IRequest) -> bytes | None:
        for name, value in _COMMON_HEADERS:
            request.setHeader(name, value)
        if request.path == HEALTH_PATH and request.method in (b"GET", b"HEAD"):
            return await self._ops.render_health(request)
        if request.path == METRICS_PATH and request.method in (b"GET", b"HEAD") and self._serve_metrics:
            return self._ops.render_metrics(request)
        if self._drained is not None:
            request.setHeader(b"connection", b"close")
            return self._answer(request, HTTPAnswer(503, "unavailable", "shutting down", retry_after=b"5"))
        if request.method != b"OPTIONS" and len(self._active) >= self._max_downloads:
            self._metrics.rejected.inc()
            return self._answer(
                request, HTTPAnswer(503, "unavailable", "too many downloads", retry_after=b"1")
            )
        self._active.add(request)
        try:
            return await self._download(request)
        except HTTPAnswer as answer:
            return self._answer(request, answer)
        except UpstreamError as exc:
            self._log.warn("CouchDB failed ({kind}): {detail}", kind=exc.kind, detail=exc.detail)
            self._metrics.upstream_errors.labels(exc.kind).inc()
            error = "gateway_timeout" if exc.status == 504 else "bad_gateway"
            return self._answer(request, HTTPAnswer(exc.status, error, "CouchDB is unavailable"))
        except CancelledError:
            raise
        except Exception:
            self._log.failure("Unexpected error while serving a download")
            if request.startedWriting:
                # Too late for an error status: break the response off.
                request.transport.abortConnection()
                return await Deferred()  # cancelled when the connection is gone
            return self._answer(request, HTTPAnswer(500, "internal_error", "internal error"))
        finally:
            self._active.discard(request)
            channel = getattr(request, "channel", None)
            if self._drained is not None and channel is not None and channel.transport is not None:
                # Klein finishes the response after this returns; then close the
                # connection (keep-alive or not), which first flushes what the
                # client has not read yet.  The channel's own loseConnection
                # unregisters it as the transport's producer; the transport's
                # would wait for that for ever.
                self._closing.append(channel.transport)
                self._clock.callLater(0, channel.loseConnection)

    def drain(self, timeout: float) -> Deferred[None]:
        """Refuse new downloads; fire once the running ones are sent and flushed, or cut at ``timeout``."""
        if self._drained is None:
            self._drained = Deferred()
            if self._active:
                self._log.info(
                    "Draining {count} download(s) for up to {timeout:g}s",
                    count=len(self._active),
                    timeout=timeout,
                )
            watch = LoopingCall(self._check_drained)
            watch.clock = self._clock
            watch.start(0.05)
            cut = self._clock.callLater(timeout, self._cut_remaining)

            def stop_watching(result: object) -> object:
                watch.stop()
                if cut.active():
                    cut.cancel()
                return result

            self._drained.addBoth(stop_watching)
        return self._drained

    def _check_drained(self) -> None:
        self._closing = [t for t in self._closing if getattr(t, "connected", False)]
        if not self._active and not self._closing and self._drained is not None and not self._drained.called:
            self._log.info("Drained: every download is sent")
            self._drained.callback(None)

    def _cut_remaining(self) -> None:
        self._log.warn(
            "Drain timeout: cutting {count} download(s)", count=len(self._active) + len(self._closing)
        )
        for request in list(self._active):
            request.transport.abortConnection()
        for transport in self._closing:
            transport.abortConnection()
        self._closing = []

    def _answer(self, request: IRequest, answer: HTTPAnswer) -> bytes:
        body = json.dumps(answer.body, separators=(",", ":")).encode("ascii")
        for name in _SUCCESS_HEADERS:  # set before the failure was known
            request.responseHeaders.removeHeader(name)
        request.setResponseCode(answer.status)
        for name, value in _COMMON_HEADERS:
            request.setHeader(name, value)
        for name, value in answer.headers.items():
            request.setHeader(name.replace("_", "-"), value)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    async def _download(self, request: IRequest) -> bytes | None:
        method = request.method
        if method == b"OPTIONS":
            return self._preflight(request)
        if method not in (b"GET", b"HEAD"):
            raise HTTPAnswer(405, "method_not_allowed", "only GET and HEAD", allow=ALLOWED_METHODS)
        try:
            target = parse_download_path(request.path)
        except BadPath as bad:
            raise HTTPAnswer(
                bad.status, "bad_request" if bad.status == 400 else "forbidden", bad.reason
            ) from None
        if self._databases and not any(fnmatchcase(target.db, pattern) for pattern in self._databases):
            raise _forbidden()  # not served here: answered before any work, like a wrong token
        client = self._throttle.client(request)
        retry = self._throttle.retry_after(client)
        if retry is not None:
            raise HTTPAnswer(
                429, "too_many_requests", "too many failed token checks", retry_after=b"%d" % retry
            )
        try:
            opens = self._credential(request, target)
            try:
                return await self._check_and_serve(request, target, opens)
            except _StaleRevision:
                # The revision we checked is gone (changed, compacted, database
                # deleted) before its change reached us: check again, from CouchDB.
                self._documents.evict(target.db, target.docid)
                return await self._check_and_serve(request, target, opens, last_try=True)
        except HTTPAnswer as answer:
            if answer.guess:
                self._throttle.failed(client)
            raise

    def _credential(self, request: IRequest, target: AttachmentPath) -> Credential:
        """What the request offers, as a test of a document summary (403 at once if nothing)."""
        offered = _offered_token(request)
        sig = _single_arg(request, b"sig")
        if sig is None:
            if not offered:
                raise _forbidden(guess=True)
            return Credential(lambda summary: summary.accepts(offered), _FORBIDDEN["reason"])
        if offered:
            raise HTTPAnswer(400, "bad_request", "give a token or a signature, not both")
        raw_expires = _single_arg(request, b"expires") or b""
        if not raw_expires.isdigit() or len(raw_expires) > 12:
            raise HTTPAnswer(400, "bad_request", "'expires' must be unix seconds")
        expires = int(raw_expires)
        now = self._clock.seconds()
        if expires <= now:
            raise HTTPAnswer(403, "forbidden", "expired")
        if expires > now + self._max_link_lifetime:
            raise HTTPAnswer(403, "forbidden", "expires too far ahead")

        def signed(summary: DocumentSummary) -> bool:
            return signature_matches(summary.tokens, target.db, target.docid, target.attachment, expires, sig)

        return Credential(signed, "bad signature")

    async def _check_and_serve(
        self, request: IRequest, target: AttachmentPath, opens: Credential, last_try: bool = False
    ) -> bytes | None:
        summary, cached = await self._documents.lookup(target.db, target.docid)
        request.cache_status = "hit" if cached else "miss"
        if summary is None or not opens.test(summary):
            raise HTTPAnswer(403, "forbidden", opens.refusal, guess=True)
        info = summary.attachments.get(target.attachment)
        if info is None:
            raise HTTPAnswer(404, "not_found", "no such attachment")
        try:
            return await self._serve(request, target, info, summary.rev)
        except _StaleRevision:
            if last_try:
                raise HTTPAnswer(404, "not_found", "no such attachment") from None
            raise

    def _preflight(self, request: IRequest) -> bytes:
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", ALLOWED_METHODS)
        request.setHeader(b"access-control-allow-headers", ALLOWED_REQUEST_HEADERS)
        request.setHeader(b"access-control-max-age", b"86400")
        return b""

    def _success_headers(
        self, request: IRequest, target: AttachmentPath, info: AttachmentInfo, etag: str | None
    ) -> None:
        for name, value in self._presentation.headers(
            target.attachment, info.content_type, request.args.get(b"download")
        ):
            request.setHeader(name, value)
        request.setHeader(b"content-type", info.content_type)
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"cache-control", b"private, no-cache")
        request.setHeader(b"vary", b"Accept-Encoding")
        if etag:
            request.setHeader(b"etag", etag.encode("ascii"))

    async def _serve(
        self, request: IRequest, target: AttachmentPath, info: AttachmentInfo, rev: str | None
    ) -> bytes | None:
        etag = info.etag
        if etag and none_match(request.getHeader(b"if-none-match"), etag):
            request.setResponseCode(304)
            self._success_headers(request, target, info, etag)
            request.responseHeaders.removeHeader(b"content-type")
            return b""
        window = choose_range(
            request.getHeader(b"range"),
            info.length,
            if_range=request.getHeader(b"if-range"),
            etag=etag,
        )
        if window is UNSATISFIABLE:
            raise HTTPAnswer(
                416,
                "range_not_satisfiable",
                "range not satisfiable",
                content_range=b"bytes */%d" % info.length,
            )
        accept_gzip = window is None and _accepts_gzip(request)
        if request.method == b"HEAD":
            self._success_headers(request, target, info, etag)
            self._length_headers(request, info, window, accept_gzip)
            return b""
        blob_key = (target.db, target.docid, target.attachment, info.digest) if info.digest else None
        if blob_key is not None and self._blobs.wants(info.length):
            body = self._blobs.get(blob_key)
            if body is not None:
                self._success_headers(request, target, info, etag)
                self._length_headers(request, info, window, accept_gzip=False)
                return body if window is None else body[window[0] : window[1]]
        response = await self._couchdb.open_attachment(
            target, rev, byte_range=window, accept_gzip=accept_gzip
        )
        return await self._relay(request, target, response, info, window, etag, blob_key)

    def _length_headers(
        self,
        request: IRequest,
        info: AttachmentInfo,
        window: tuple[int, int] | None,
        accept_gzip: bool,
    ) -> None:
        """Headers a HEAD answer takes from the stub alone."""
        if window is not None:
            start, stop = window
            request.setResponseCode(206)
            request.setHeader(b"content-range", _content_range(window, info))
            request.setHeader(b"content-length", b"%d" % (stop - start))
        elif accept_gzip and info.encoding == "gzip" and info.encoded_length is not None:
            request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-length", b"%d" % info.encoded_length)
        elif info.length is not None:
            request.setHeader(b"content-length", b"%d" % info.length)

    async def _relay(
        self,
        request: IRequest,
        target: AttachmentPath,
        response: IResponse,
        info: AttachmentInfo,
        window: tuple[int, int] | None,
        etag: str | None,
        blob_key: BlobKey | None = None,
    ) -> bytes | None:
        """Check CouchDB's answer, then stream it (sliced to ``window`` if CouchDB sent it all).

        A small, whole, identity-encoded body whose ETag matches the checked
        digest is kept in the blob cache as it streams past.
        """
        if response.code == 404:
            await self._couchdb.discard(response)
            raise _StaleRevision()
        if response.code not in (200, 206) or (response.code == 206 and window is None):
            await self._couchdb.discard(response)
            raise UpstreamError("status", f"CouchDB answered {response.code} for an attachment")
        encoding = response.headers.getRawHeaders(b"content-encoding", [None])[0]
        skip, limit = 0, None
        if window is not None:
            start, stop = window
            if encoding not in (None, b"identity"):
                _refuse(response, "CouchDB compressed a ranged attachment")
            if response.code == 200:
                skip, limit = start, stop - start
            elif response.headers.getRawHeaders(b"content-range", [b""])[0] != _content_range(window, info):
                _refuse(response, "CouchDB answered another range than asked")
        upstream_etag = response.headers.getRawHeaders(b"etag", [None])[0]
        self._success_headers(
            request, target, info, upstream_etag.decode("latin-1") if upstream_etag else etag
        )
        if window is not None:
            self._length_headers(request, info, window, accept_gzip=False)
        else:
            if encoding is not None:
                request.setHeader(b"content-encoding", encoding)
            if response.length is not UNKNOWN_LENGTH:
                request.setHeader(b"content-length", b"%d" % response.length)
        keep = (
            blob_key is not None
            and window is None
            and encoding in (None, b"identity")
            and upstream_etag is not None
            and upstream_etag.decode("latin-1") == etag
            and self._blobs.wants(info.length)
        )
        tee: list[bytes] | None = [] if keep else None
        await relay_body(
            response,
            request,
            skip,
            limit,
            clock=self._clock,
            idle_timeout=self._idle_timeout,
            on_idle=self._metrics.idle_disconnects.inc,
            tee=tee,
            upstream_timeout=self._upstream_timeout,
        )
        if tee is not None and blob_key is not None:
            body = b"".join(tee)
            if len(body) == info.length:
                self._blobs.put(blob_key, body)
        return None


def _content_range(window: tuple[int, int], info: AttachmentInfo) -> bytes:
    start, stop = window
    return b"bytes %d-%d/%d" % (start, stop - 1, info.length)


def _refuse(response: IResponse, detail: str) -> None:
    """Drop an unusable attachment response and fail with a 502."""
    response.deliverBody(_Discard())
    raise UpstreamError("protocol", detail)


class _Discard:
    """A body protocol that stops the transfer at once."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass
