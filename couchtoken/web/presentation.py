"""How a served file presents itself to a browser: Content-Disposition and the sandbox.

- ``Content-Disposition`` is ``inline`` unless the link asks for a download
  (``?download`` or ``download=1``) or the type is forced to download; both
  carry an ASCII ``filename`` fallback and the exact name as RFC 5987
  ``filename*`` (RFC 6266), taken from the attachment name's last segment.
- Active content (HTML, XHTML, SVG, XML, and ``--sandbox-types``) is served
  with ``Content-Security-Policy: sandbox``, as CouchDB 3.2+ does, so a
  stored file cannot run script in the service's origin.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote

ACTIVE_TYPES = frozenset(
    {"text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml"}
)
_NOT_IN_FALLBACK = re.compile(r'[^\x20-\x7e]|["\\]')
_ATTR_CHARS = "!#$&+-.^_`|~"  # RFC 5987 attr-char, besides letters and digits
_FALSE = frozenset({b"0", b"false", b"no"})


def media_type(content_type: bytes) -> str:
    """``text/HTML; charset=utf-8`` -> ``text/html``."""
    return content_type.split(b";", 1)[0].strip().decode("latin-1").lower()


def wants_download(values: list[bytes] | None) -> bool:
    """Whether the query's ``download`` values ask for a download (``?download``, ``download=1``)."""
    return bool(values) and values[-1].strip().lower() not in _FALSE


def content_disposition(attachment: str, download: bool) -> bytes:
    """``inline|attachment; filename="<ascii>"; filename*=UTF-8''<percent-encoded>``."""
    name = attachment.rsplit("/", 1)[-1]
    fallback = _NOT_IN_FALLBACK.sub("_", name)
    exact = quote(name, safe=_ATTR_CHARS)
    kind = "attachment" if download else "inline"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{exact}".encode("ascii")


class Presentation:
    """The per-deployment rules: which types are sandboxed, which are always downloaded."""

    def __init__(self, sandbox_types: Iterable[str] = (), force_download_types: Iterable[str] = ()) -> None:
        self._sandboxed = ACTIVE_TYPES | {t.strip().lower() for t in sandbox_types if t.strip()}
        self._forced = frozenset(t.strip().lower() for t in force_download_types if t.strip())

    def headers(self, attachment: str, content_type: bytes, download_values: list[bytes] | None) -> list:
        kind = media_type(content_type)
        download = wants_download(download_values) or kind in self._forced
        result = [(b"content-disposition", content_disposition(attachment, download))]
        if kind in self._sandboxed:
            result.append((b"content-security-policy", b"sandbox"))
        return result
