"""Parse a download path into CouchDB names, and encode names for upstream URLs.

Twisted unquotes path segments before routing, which loses the difference
between ``/`` and ``%2F``.  So the raw ``request.path`` is parsed here:

    /<db>/<docid>/<attachment...>

A ``%2F`` inside the database or document segment is part of that name; the
attachment name is the rest of the path, its raw slashes kept (as CouchDB
routes it).  Every name is validated before anything is sent upstream, and
each is percent-encoded segment by segment when an upstream URL is built.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

import attrs

MAX_NAME_BYTES = 4096
_DATABASE_NAME = re.compile(r"[a-z][a-z0-9_$()+/-]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadPath(ValueError):
    """The path is not a download path; ``status`` is what the client gets."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@attrs.frozen
class AttachmentPath:
    """A validated (database, document id, attachment name) triple."""

    db: str
    docid: str
    attachment: str

    @property
    def document_key(self) -> tuple[str, str]:
        return (self.db, self.docid)


def _decode(segment: bytes, what: str) -> str:
    raw = unquote_to_bytes(segment)
    if len(raw) > MAX_NAME_BYTES:
        raise BadPath(f"{what} is too long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath(f"{what} is not valid UTF-8") from None
    if not text:
        raise BadPath(f"{what} is empty")
    if _CONTROL.search(text):
        raise BadPath(f"{what} holds a control character")
    if "." in text and any(part in (".", "..") for part in text.split("/")):
        raise BadPath(f"{what} holds a '.' or '..' segment")
    return text


def parse_download_path(path: bytes) -> AttachmentPath:
    """Split and validate a raw request path (without its query string)."""
    if not path.startswith(b"/"):
        raise BadPath("the path must start with '/'")
    segments = path[1:].split(b"/")
    if len(segments) < 3:
        raise BadPath("expected /<database>/<document>/<attachment>")
    db = _decode(segments[0], "the database name")
    docid = _decode(segments[1], "the document id")
    attachment = "/".join(_decode(s, "the attachment name") for s in segments[2:])
    if db.startswith("_") or docid.startswith("_"):
        raise BadPath("system databases and documents are not served", status=403)
    if not _DATABASE_NAME.match(db):
        raise BadPath("not a valid CouchDB database name")
    return AttachmentPath(db=db, docid=docid, attachment=attachment)


def encode_segment(name: str) -> str:
    """Percent-encode one name as a single URL path segment (``/`` too)."""
    return quote(name, safe="")


def document_path(db: str, docid: str) -> str:
    """``/<db>/<docid>`` for CouchDB, each name one encoded segment."""
    return f"/{encode_segment(db)}/{encode_segment(docid)}"


def attachment_path(target: AttachmentPath) -> str:
    """``/<db>/<docid>/<attachment>``; the attachment's slashes stay raw."""
    encoded = "/".join(encode_segment(part) for part in target.attachment.split("/"))
    return f"{document_path(target.db, target.docid)}/{encoded}"
