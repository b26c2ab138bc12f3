"""How a served file presents itself to a browser: Content-Disposition and the sandbox.

- ``Content-Disposition`` is ``inline`` unless the link asks for a download
  (``?download`` or ``download=1``) or the type is forced to download; both
  carry an ASCII ``filename`` fallback and the exact name as RFC 5987
  ``filename*`` (RFC 6266), taken from the attachment name's last segment.
  ``application/octet-stream`` (also what a missing or unusable stored type
  becomes) is always a download.
- Every type but the passive ones (raster images, audio, video, PDF, plain
  text, CSV; see ``couchtoken.access.mediatypes``) is served with
  ``Content-Security-Policy: sandbox``, and so are the passive types listed
  in ``--sandbox-types``: a stored file cannot run script in the service's
  origin, whatever it claims to be.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote

from couchtoken.access.mediatypes import OCTET_STREAM, TypeSet, essence, is_passive

_NOT_IN_FALLBACK = re.compile(r'[^\x20-\x7e]|["\\]')
_ATTR_CHARS = "!#$&+-.^_`|~"  # RFC 5987 attr-char, besides letters and digits
_FALSE = frozenset({b"0", b"false", b"no"})


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
    """The per-deployment rules: which passive types are sandboxed anyway, which are always downloaded.

    Option items are ``type/subtype`` or ``type/*``; anything else is a ValueError.
    """

    def __init__(self, sandbox_types: Iterable[str] = (), force_download_types: Iterable[str] = ()) -> None:
        self._sandboxed = TypeSet(sandbox_types)
        self._forced = TypeSet(force_download_types)

    def headers(self, attachment: str, content_type: bytes, download_values: list[bytes] | None) -> list:
        kind = essence(content_type) or OCTET_STREAM
        download = wants_download(download_values) or kind == OCTET_STREAM or kind in self._forced
        result = [(b"content-disposition", content_disposition(attachment, download))]
        if not is_passive(kind) or kind in self._sandboxed:
            result.append((b"content-security-policy", b"sandbox"))
        return result
