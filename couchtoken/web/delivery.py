"""Sending a checked attachment: 304, ranges, HEAD, the blob or disk cache, or a relay from CouchDB."""

from __future__ import annotations

from typing import Any, NoReturn

from twisted.logger import Logger
from twisted.web.iweb import UNKNOWN_LENGTH, IRequest, IResponse
from werkzeug.http import parse_accept_header

from couchtoken.access.attachments import AttachmentInfo
from couchtoken.access.names import AttachmentPath
from couchtoken.upstream.blobs import BlobCache, BlobKey
from couchtoken.upstream.client import CouchDBClient, UpstreamError
from couchtoken.upstream.diskcache import DiskCache, DiskFill
from couchtoken.web.abort import break_off
from couchtoken.web.answers import HTTPAnswer
from couchtoken.web.conditional import UNSATISFIABLE, choose_range, none_match
from couchtoken.web.filesend import FileReadError, send_file
from couchtoken.web.metrics import Metrics
from couchtoken.web.presentation import Presentation
from couchtoken.web.query import query_args
from couchtoken.web.relay import Tee, relay_body

_log = Logger()


class StaleRevision(Exception):
    """CouchDB has no such attachment at the revision the token was checked against."""


def accepts_gzip(request: IRequest) -> bool:
    header = request.getHeader(b"accept-encoding")
    if not header:
        return False
    return parse_accept_header(header.decode("latin-1"))["gzip"] > 0


class Delivery:
    """Answers a request for an attachment whose token check has passed."""

    def __init__(
        self,
        couchdb: CouchDBClient,
        blobs: BlobCache,
        presentation: Presentation,
        metrics: Metrics,
        *,
        clock: Any,
        idle_timeout: float,
        upstream_timeout: float,
        disk: DiskCache | None = None,
    ) -> None:
        self._couchdb = couchdb
        self._blobs = blobs
        self._disk = disk if disk is not None else DiskCache(None, 0, 0)
        self._presentation = presentation
        self._metrics = metrics
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._upstream_timeout = upstream_timeout

    async def send(
        self, request: IRequest, target: AttachmentPath, info: AttachmentInfo, rev: str | None
    ) -> bytes | None:
        """The body to finish with (None when it was streamed); raises StaleRevision or HTTPAnswer."""
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
        gzip_ok = window is None and accepts_gzip(request)
        if request.method == b"HEAD":
            self._success_headers(request, target, info, etag)
            self._length_headers(request, info, window, gzip_ok)
            return b""
        blob_key = (target.db, target.docid, target.attachment, info.digest) if info.digest else None
        if blob_key is not None and self._blobs.wants(info.length):
            body = self._blobs.get(blob_key)
            if body is not None:
                self._success_headers(request, target, info, etag)
                self._length_headers(request, info, window, gzip_ok=False)
                return body if window is None else body[window[0] : window[1]]
        if blob_key is not None and self._on_disk(info.length):
            cached = self._disk.open(blob_key, info.length)
            if cached is not None:
                self._success_headers(request, target, info, etag)
                self._length_headers(request, info, window, gzip_ok=False)
                start, stop = window or (0, cached.length)
                try:
                    await send_file(
                        request,
                        cached.fd,
                        cached.offset + start,
                        stop - start,
                        clock=self._clock,
                        idle_timeout=self._idle_timeout,
                        on_idle=self._metrics.idle_disconnects.inc,
                    )
                except FileReadError as broken:
                    self._disk.broken(blob_key, broken.why)
                    await self._finish_from_couchdb(request, target, rev, info, start + broken.sent, stop)
                return None
        response, release = await self._couchdb.open_attachment(
            target, rev, byte_range=window, accept_gzip=gzip_ok
        )
        try:
            return await self._relay(request, target, response, info, window, etag, blob_key)
        finally:
            release()  # the body is relayed whole, dropped, or cut off (the client left): the slot is free

    def _on_disk(self, length: int | None) -> bool:
        """Bodies too large for memory (or all of them, with the blob cache off) go to disk."""
        return self._disk.wants(length) and not self._blobs.wants(length)

    def _success_headers(
        self, request: IRequest, target: AttachmentPath, info: AttachmentInfo, etag: str | None
    ) -> None:
        for name, value in self._presentation.headers(
            target.attachment, info.content_type, query_args(request).get(b"download")
        ):
            request.setHeader(name, value)
        request.setHeader(b"content-type", info.content_type)
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"cache-control", b"private, no-cache")
        request.setHeader(b"vary", b"Accept-Encoding")
        if etag:
            request.setHeader(b"etag", etag.encode("ascii"))

    def _length_headers(
        self, request: IRequest, info: AttachmentInfo, window: tuple[int, int] | None, gzip_ok: bool
    ) -> None:
        """Headers an answer can take from the document's attachment stub alone."""
        if window is not None:
            start, stop = window
            request.setResponseCode(206)
            request.setHeader(b"content-range", content_range(window, info))
            request.setHeader(b"content-length", b"%d" % (stop - start))
        elif gzip_ok and info.encoding == "gzip" and info.encoded_length is not None:
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
            raise StaleRevision()
        if response.code not in (200, 206) or (response.code == 206 and window is None):
            await self._couchdb.discard(response)
            raise UpstreamError("status", f"CouchDB answered {response.code} for an attachment")
        encoding = response.headers.getRawHeaders(b"content-encoding", [None])[0]
        skip, limit = 0, None
        if window is not None:
            if encoding not in (None, b"identity"):
                _refuse(response, "CouchDB compressed a ranged attachment")
            cut = cut_to(response, window, info)
            if cut is None:
                _refuse(response, "CouchDB answered another range than asked")
            skip, limit = cut
        upstream_etag = response.headers.getRawHeaders(b"etag", [None])[0]
        self._success_headers(
            request, target, info, upstream_etag.decode("latin-1") if upstream_etag else etag
        )
        if window is not None:
            self._length_headers(request, info, window, gzip_ok=False)
        else:
            if encoding is not None:
                request.setHeader(b"content-encoding", encoding)
            if response.length is not UNKNOWN_LENGTH:
                request.setHeader(b"content-length", b"%d" % response.length)
        keepable = (
            blob_key is not None
            and encoding in (None, b"identity")
            and upstream_etag is not None
            and upstream_etag.decode("latin-1") == etag
        )
        tee: list[bytes] | None = None
        fill: DiskFill | None = None
        if keepable and window is None and self._blobs.wants(info.length):
            tee = []
        elif keepable and window in (None, (0, info.length)) and self._on_disk(info.length):
            fill = self._disk.start_fill(
                blob_key,  # type: ignore[arg-type]
                info,
                stored_compressed=stored_compressed(info, response),
            )
            if fill is not None:
                # However the download ends, an unfinished fill leaves nothing behind.
                request.notifyFinish().addBoth(lambda _: fill.abandon())
        try:
            await self._stream(request, response, skip, limit, tee=tee if fill is None else fill)
        except BaseException:
            if fill is not None:
                fill.abandon()
            raise
        if fill is not None:
            fill.commit()
        if tee is not None and blob_key is not None:
            body = b"".join(tee)
            if len(body) == info.length:
                self._blobs.put(blob_key, body)
        return None

    async def _stream(
        self, request: IRequest, response: IResponse, skip: int, limit: int | None, tee: Tee | None = None
    ) -> None:
        """Relay CouchDB's body to the client, with the service's idle and upstream timeouts."""
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

    async def _finish_from_couchdb(
        self,
        request: IRequest,
        target: AttachmentPath,
        rev: str | None,
        info: AttachmentInfo,
        start: int,
        stop: int,
    ) -> None:
        """A disk file broke off after the headers: send bytes ``[start, stop)`` from CouchDB.

        Anything but the same bytes (another digest, a status or range we did
        not ask for, a compressed body) breaks the client connection off instead.
        """
        release = None
        try:
            response, release = await self._couchdb.open_attachment(
                target, rev, byte_range=(start, stop), accept_gzip=False
            )
            etag = response.headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")
            encoding = response.headers.getRawHeaders(b"content-encoding", [None])[0]
            cut = cut_to(response, (start, stop), info)
            if cut is None:
                await self._couchdb.discard(response)
                raise UpstreamError("status", f"CouchDB answered {response.code} for the rest of a file")
            if etag != info.etag or encoding not in (None, b"identity"):
                _refuse(response, "CouchDB sent other bytes for the rest of a file")
            await self._stream(request, response, *cut)
        except UpstreamError as exc:
            _log.warn(
                "Could not finish a download from CouchDB after a disk cache read error ({kind}): "
                "{detail}; aborting the client response",
                kind=exc.kind,
                detail=exc.detail,
            )
            self._metrics.upstream_errors.labels(exc.kind).inc()
            await break_off(request)  # the connection, or over HTTP/2 the stream only
        finally:
            if release is not None:
                release()  # the CouchDB request slot (--max-connections) is free again


def stored_compressed(info: AttachmentInfo, response: IResponse) -> bool:
    """Whether CouchDB keeps this attachment gzip-compressed (its digest is then of those bytes).

    The stub says so only when the document was read with ``att_encoding_info``;
    CouchDB also answers ``Accept-Ranges: none`` exactly for such attachments.
    """
    accept_ranges = response.headers.getRawHeaders(b"accept-ranges", [b""])[0]
    return info.encoding not in (None, "identity") or accept_ranges.strip().lower() == b"none"


def cut_to(
    response: IResponse, window: tuple[int, int], info: AttachmentInfo
) -> tuple[int, int | None] | None:
    """How to cut CouchDB's answer down to ``window``, as ``(skip, limit)`` for the relay.

    A 200 carries the whole body (PouchDB Server ignores ``Range``): the window
    is cut out of it.  A 206 must carry exactly that range.  None for anything else.
    """
    start, stop = window
    if response.code == 200:
        return start, stop - start
    sent = response.headers.getRawHeaders(b"content-range", [b""])[0]
    if response.code == 206 and sent == content_range(window, info):
        return 0, None
    return None


def content_range(window: tuple[int, int], info: AttachmentInfo) -> bytes:
    start, stop = window
    return b"bytes %d-%d/%d" % (start, stop - 1, info.length)


def _refuse(response: IResponse, detail: str) -> NoReturn:
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
