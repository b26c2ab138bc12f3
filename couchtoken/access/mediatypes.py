"""Media types: strict parsing, and which types a browser only ever shows passively.

A stored ``content_type`` is used only if it is exactly one RFC 9110
``type "/" subtype *( OWS ";" OWS [ name "=" ( token / quoted-string ) ] )``
in printable ASCII (surrounding white space aside) and holds no comma at all:
browsers read a comma as a second value (``text/plain,text/html`` is HTML to
Chromium), so even a quoted one is refused.  Written by hand, because
werkzeug's ``parse_options_header`` accepts anything.

Passive types are the ones a browser shows without running anything from
the file: raster images, audio, video, PDF, plain text and CSV.  Everything
else is served with ``Content-Security-Policy: sandbox``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

OCTET_STREAM = "application/octet-stream"
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_PARAMETER = rb"[ \t]*;(?:[ \t]*" + _TOKEN + rb"=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
_MEDIA_TYPE = re.compile(rb"(" + _TOKEN + rb"/" + _TOKEN + rb")(?:" + _PARAMETER + rb")*\Z")
_ESSENCE = re.compile(_TOKEN.decode() + "/" + _TOKEN.decode() + r"\Z")

PASSIVE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/avif",
        "image/bmp",
        "image/x-icon",
        "image/vnd.microsoft.icon",
        "application/pdf",
        "text/plain",
        "text/csv",
    }
)
PASSIVE_TOP_LEVEL = ("audio/", "video/")


def essence(content_type: bytes) -> str | None:
    """``Text/Plain; charset=utf-8`` -> ``text/plain``; None unless it is one well-formed media type."""
    raw = content_type.strip(b" \t")
    if b"," in raw:
        return None
    match = _MEDIA_TYPE.match(raw)
    return match.group(1).decode("ascii").lower() if match else None


def is_passive(kind: str) -> bool:
    """Whether a browser shows ``kind`` (an essence) without running anything from the file."""
    return kind in PASSIVE_TYPES or kind.startswith(PASSIVE_TOP_LEVEL)


class TypeSet:
    """Media types named in an option: ``type/subtype`` exactly, or ``type/*`` for all subtypes."""

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._items = frozenset(parse_type_option(item) for item in items)

    def __contains__(self, kind: str) -> bool:
        return kind in self._items or kind.partition("/")[0] + "/*" in self._items


def parse_type_option(item: str) -> str:
    """One option item, lowercased; ValueError unless it is ``type/subtype`` with no parameters."""
    value = item.strip().lower()
    if not _ESSENCE.match(value) or value.startswith("*"):
        raise ValueError(f"{item!r} is not a media type (type/subtype)")
    return value
