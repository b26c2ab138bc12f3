"""What a download needs to know about one attachment, from its stub.

A content type that is not one well-formed media type (see ``mediatypes``)
becomes ``application/octet-stream``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from couchtoken.access.mediatypes import OCTET_STREAM, essence

DEFAULT_CONTENT_TYPE = OCTET_STREAM.encode("ascii")
_SAFE_DIGEST = re.compile(r"[A-Za-z0-9+/=_-]+\Z")


@attrs.frozen
class AttachmentInfo:
    """Metadata of an attachment as CouchDB describes it in ``_attachments``."""

    content_type: bytes
    length: int | None
    digest: str | None
    encoding: str | None = None
    encoded_length: int | None = None

    @classmethod
    def from_stub(cls, stub: Mapping[str, Any]) -> AttachmentInfo:
        content_type = stub.get("content_type")
        raw_type = content_type.encode("utf-8").strip(b" \t") if isinstance(content_type, str) else b""
        if essence(raw_type) is None:
            raw_type = DEFAULT_CONTENT_TYPE
        return cls(
            content_type=raw_type,
            length=_count(stub.get("length")),
            digest=stub.get("digest") if isinstance(stub.get("digest"), str) else None,
            encoding=stub.get("encoding") if isinstance(stub.get("encoding"), str) else None,
            encoded_length=_count(stub.get("encoded_length")),
        )

    @property
    def etag(self) -> str | None:
        """The ETag CouchDB sends for this attachment: its MD5 digest, quoted."""
        if not self.digest or not _SAFE_DIGEST.match(self.digest):
            return None
        value = self.digest[4:] if self.digest.startswith("md5-") else self.digest
        return f'"{value}"'


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
