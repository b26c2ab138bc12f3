"""The download route: check the token, then stream the attachment.

``GET|HEAD /<db>/<docid>/<attachment>?token=<t>``.  Every failure that could
tell an outsider something (wrong token, no token in the document, missing
document or database) gets the same 403; only a valid token learns that an
attachment is missing (404).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from fnmatch import fnmatchcase
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import NotFound

from couchtoken.access.links import DEFAULT_MAX_LIFETIME
from couchtoken.access.names import AttachmentPath, BadPath, parse_download_path
from couchtoken.access.throttle import Attempt, GuessThrottle, Throttled
from couchtoken.upstream.cache import DocumentCache
from couchtoken.upstream.client import UpstreamError
from couchtoken.web.abort import break_off
from couchtoken.web.answers import HTTPAnswer, forbidden, set_common_headers, write_answer
from couchtoken.web.credentials import Credential, read_credential
from couchtoken.web.delivery import Delivery, StaleRevision
from couchtoken.web.inflight import InFlight
from couchtoken.web.metrics import Metrics

ALLOWED_METHODS = b"GET, HEAD, OPTIONS"
ALLOWED_REQUEST_HEADERS = b"Range, If-None-Match, If-Range, Authorization, X-Download-Token"

# An operator page (``/_health``...) renders itself onto a request.
OperatorPage = Callable[[IRequest], Awaitable[bytes] | bytes]


class DownloadApp:
    """Klein routes of the public download port."""

    app = Klein()
    # Keep "//" and friends away from werkzeug's redirecting slash merge:
    # malformed paths must get a 400, not a redirect.
    app.url_map.merge_slashes = False

    def __init__(
        self,
        documents: DocumentCache,
        delivery: Delivery,
        in_flight: InFlight,
        *,
        metrics: Metrics,
        clock: Any,
        operator_pages: Mapping[bytes, OperatorPage] = {},  # noqa: B006 - never mutated
        databases: tuple[str, ...] = (),
        max_link_lifetime: float = DEFAULT_MAX_LIFETIME,
        throttle: GuessThrottle | None = None,
    ) -> None:
        self._documents = documents
        self._delivery = delivery
        self.in_flight = in_flight
        self._metrics = metrics
        self._clock = clock
        self._operator_pages = dict(operator_pages)
        self._databases = databases
        self._max_link_lifetime = max_link_lifetime
        self._throttle = throttle or GuessThrottle(clock, 0)
        self._log = Logger()
        metrics.in_flight.set_function(lambda: len(self.in_flight))

    def resource(self) -> Any:
        return self.app.resource()

    @app.handle_errors(NotFound)
    def _unroutable(self, request: IRequest, failure: Any) -> bytes:
        return write_answer(request, HTTPAnswer(400, "bad_request", "malformed path"))

    @app.route("/", branch=True, strict_slashes=False)
    async def download(self, request: IRequest) -> bytes | None:
        set_common_headers(request)
        page = self._operator_pages.get(request.path)
        if page is not None and request.method in (b"GET", b"HEAD"):
            rendered = page(request)
            return await rendered if inspect.isawaitable(rendered) else rendered
        if self.in_flight.draining:
            request.setHeader(b"connection", b"close")
            return write_answer(request, HTTPAnswer(503, "unavailable", "shutting down", retry_after=b"5"))
        if request.method != b"OPTIONS" and self.in_flight.full():
            self._metrics.rejected.inc()
            return write_answer(
                request, HTTPAnswer(503, "unavailable", "too many downloads", retry_after=b"1")
            )
        self.in_flight.add(request)
        try:
            return await self._download(request)
        except HTTPAnswer as answer:
            return write_answer(request, answer)
        except UpstreamError as exc:
            self._log.warn("CouchDB failed ({kind}): {detail}", kind=exc.kind, detail=exc.detail)
            self._metrics.upstream_errors.labels(exc.kind).inc()
            error = "gateway_timeout" if exc.status == 504 else "bad_gateway"
            return write_answer(request, HTTPAnswer(exc.status, error, "CouchDB is unavailable"))
        except CancelledError:
            raise
        except Exception:
            self._log.failure("Unexpected error while serving a download")
            if request.startedWriting:
                # Too late for an error status: break the response off.
                await break_off(request)
            return write_answer(request, HTTPAnswer(500, "internal_error", "internal error"))
        finally:
            self.in_flight.done(request)

    async def _download(self, request: IRequest) -> bytes | None:
        """The steps of a download: method, path, allowlist, throttle, credential, check, send."""
        if request.method == b"OPTIONS":
            return _preflight(request)
        if request.method not in (b"GET", b"HEAD"):
            raise HTTPAnswer(405, "method_not_allowed", "only GET and HEAD", allow=ALLOWED_METHODS)
        target = _parse_target(request)
        if self._databases and not any(fnmatchcase(target.db, pattern) for pattern in self._databases):
            raise forbidden()  # not served here: answered before any work, like a wrong token
        try:
            # Counted as a failure from here until the check passes.
            attempt = self._throttle.start(self._throttle.client(request), target.document_key)
        except Throttled as throttled:
            raise HTTPAnswer(
                429,
                "too_many_requests",
                "too many failed token checks",
                retry_after=b"%d" % throttled.retry_after,
            ) from None
        try:
            credential = read_credential(request, target, self._clock, self._max_link_lifetime)
            try:
                return await self._check_and_send(request, target, credential, attempt)
            except StaleRevision:
                # The revision we checked is gone (changed, compacted, database
                # deleted) before its change reached us: check again, from CouchDB.
                self._documents.evict(target.db, target.docid)
                return await self._check_and_send(request, target, credential, attempt, last_try=True)
        except HTTPAnswer as answer:
            if answer.guess:
                attempt.failed()
            raise
        finally:
            attempt.passed()  # no verdict (an error, a 400): not a failure

    async def _check_and_send(
        self,
        request: IRequest,
        target: AttachmentPath,
        credential: Credential,
        attempt: Attempt,
        last_try: bool = False,
    ) -> bytes | None:
        summary, cached = await self._documents.lookup(target.db, target.docid)
        request.cache_status = "hit" if cached else "miss"
        if summary is None or not credential.test(summary):
            raise forbidden(credential.refusal, guess=True)
        attempt.passed()
        self._documents.served(target.db)
        info = summary.attachments.get(target.attachment)
        if info is None:
            raise HTTPAnswer(404, "not_found", "no such attachment")
        try:
            return await self._delivery.send(request, target, info, summary.rev)
        except StaleRevision:
            if last_try:
                raise HTTPAnswer(404, "not_found", "no such attachment") from None
            raise


def _parse_target(request: IRequest) -> AttachmentPath:
    try:
        return parse_download_path(request.path)
    except BadPath as bad:
        raise HTTPAnswer(
            bad.status, "bad_request" if bad.status == 400 else "forbidden", bad.reason
        ) from None


def _preflight(request: IRequest) -> bytes:
    request.setResponseCode(204)
    request.setHeader(b"access-control-allow-methods", ALLOWED_METHODS)
    request.setHeader(b"access-control-allow-headers", ALLOWED_REQUEST_HEADERS)
    request.setHeader(b"access-control-max-age", b"86400")
    return b""
