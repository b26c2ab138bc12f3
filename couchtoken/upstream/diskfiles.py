"""The disk cache's files: their names, the header each starts with, and checking a body.

A cache directory holds a marker file, ``data/`` (one file per cached
attachment) and ``tmp/`` (fills being written).  A data file is named by the
SHA-256 of its key and starts with a header that names the key again, so a
file can be checked against what it claims to be::

    couchtoken-disk-cache 1\\n
    {"md5": "<hex MD5 of the body>", "key": [db, docid, attachment, digest],
     "length": N, "identity": true}\\n
    <the body, N bytes>

``identity`` says CouchDB's digest is the MD5 of these very bytes (the
attachment is stored uncompressed); for gzip-stored attachments the digest is
of the compressed bytes, and only the header's own MD5 can be checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Callable

import attrs

CacheKey = tuple[str, str, str, str]  # database, document id, attachment name, CouchDB's digest

MARKER_NAME = "couchtoken-disk-cache"
MARKER_TEXT = "couchtoken disk cache, format 1. Everything here is managed by couchtoken.\n"
DATA, TMP = "data", "tmp"
FORMAT_LINE = b"couchtoken-disk-cache 1\n"
MAX_HEADER = 64 * 1024  # names are at most 4 KiB each (access/names.py), JSON escapes included
_MD5_PLACEHOLDER = "0" * 32
_FILE_NAME = re.compile(r"[0-9a-f]{64}\Z")
_READ = 1024 * 1024


def file_name(key: CacheKey) -> str:
    """The data file's name: SHA-256 of the key (names may hold anything, the file name may not)."""
    return hashlib.sha256(json.dumps(list(key), ensure_ascii=False).encode("utf-8")).hexdigest()


def looks_like_file_name(name: str) -> bool:
    return bool(_FILE_NAME.match(name))


def digest_md5(digest: str) -> bytes | None:
    """The 16 bytes of an ``md5-<base64>`` digest, or None for anything else."""
    if not digest.startswith("md5-"):
        return None
    try:
        raw = base64.b64decode(digest[4:], validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 16 else None


@attrs.frozen
class Header:
    """What a data file says about itself."""

    key: CacheKey
    length: int
    md5: str  # hex MD5 of the body
    identity: bool  # CouchDB's digest is the MD5 of the body

    def encode(self) -> bytes:
        fields = {"md5": self.md5, "key": list(self.key), "length": self.length, "identity": self.identity}
        return FORMAT_LINE + json.dumps(fields, ensure_ascii=False).encode("utf-8") + b"\n"

    @classmethod
    def blank(cls, key: CacheKey, length: int, identity: bool) -> Header:
        """A header whose MD5 is written later, in place (see ``md5_position``)."""
        return cls(key=key, length=length, md5=_MD5_PLACEHOLDER, identity=identity)

    @staticmethod
    def md5_position(encoded: bytes) -> int:
        """Where the MD5's hex digits sit in an encoded blank header."""
        return encoded.index(b'"md5": "' + _MD5_PLACEHOLDER.encode()) + len(b'"md5": "')

    @classmethod
    def decode(cls, raw: bytes) -> tuple[Header, int] | None:
        """The header at the start of ``raw`` and where the body starts, or None if it is not ours."""
        if not raw.startswith(FORMAT_LINE):
            return None
        end = raw.find(b"\n", len(FORMAT_LINE))
        if end < 0:
            return None
        try:
            fields = json.loads(raw[len(FORMAT_LINE) : end].decode("utf-8"))
            key = tuple(fields["key"])
            header = cls(
                key=key,  # type: ignore[arg-type]
                length=fields["length"],
                md5=fields["md5"],
                identity=fields["identity"],
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        if (
            len(key) != 4
            or not all(isinstance(part, str) for part in key)
            or not isinstance(header.length, int)
            or isinstance(header.length, bool)
            or header.length <= 0
            or not isinstance(header.md5, str)
            or not re.fullmatch(r"[0-9a-f]{32}", header.md5)
            or header.identity not in (True, False)
        ):
            return None
        return header, end + 1


def read_header(path: str) -> tuple[Header, int, os.stat_result] | None:
    """A data file's header, body offset and stat; None when it is not a file of ours."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        decoded = Header.decode(handle.read(MAX_HEADER))
    if decoded is None:
        return None
    header, offset = decoded
    if os.path.basename(path) != file_name(header.key) or stat.st_size != offset + header.length:
        return None
    return header, offset, stat


def body_matches(path: str, header: Header, offset: int, stopping: Callable[[], bool]) -> bool | None:
    """Whether the body has its length, the header's MD5 and, if ``identity``, CouchDB's digest.

    Reads the whole body (run it in a thread); None when ``stopping()`` turned true meanwhile.
    """
    md5 = hashlib.md5()
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size != offset + header.length:
            return False
        handle.seek(offset)
        while chunk := handle.read(_READ):
            if stopping():
                return None
            md5.update(chunk)
    if md5.hexdigest() != header.md5:
        return False
    return not header.identity or digest_md5(header.key[3]) == md5.digest()
