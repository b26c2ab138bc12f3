"""Range and conditional-request decisions, on werkzeug's header parsers."""

from __future__ import annotations

import enum

from werkzeug.http import parse_etags, parse_if_range_header, parse_range_header, unquote_etag


class Unsatisfiable(enum.Enum):
    """The Range cannot be served for this length (answer 416)."""

    RANGE = "unsatisfiable"


UNSATISFIABLE = Unsatisfiable.RANGE


def none_match(if_none_match: bytes | None, etag: str) -> bool:
    """True when ``If-None-Match`` names ``etag`` (weak comparison) or is ``*``."""
    if not if_none_match:
        return False
    value, _weak = unquote_etag(etag)
    return parse_etags(if_none_match.decode("latin-1")).contains_weak(value)


def choose_range(
    range_header: bytes | None,
    length: int | None,
    *,
    if_range: bytes | None = None,
    etag: str | None = None,
) -> tuple[int, int] | Unsatisfiable | None:
    """The single byte window ``(start, stop)`` to serve, if any.

    None means "send the whole body": no Range, a Range we ignore (other
    units, several ranges, bad syntax: RFC 9110 lets a server ignore them),
    an unknown length, or an ``If-Range`` that does not match ``etag``.
    """
    if not range_header or length is None:
        return None
    if if_range is not None:
        wanted = parse_if_range_header(if_range.decode("latin-1"))
        if wanted.etag is None or etag is None or wanted.etag != unquote_etag(etag)[0]:
            return None
    parsed = parse_range_header(range_header.decode("latin-1"))
    if parsed is None or parsed.units != "bytes" or len(parsed.ranges) != 1:
        return None
    start, stop = parsed.ranges[0]
    if start < 0 and stop is None:  # suffix range: "-n"
        if length == 0:
            return UNSATISFIABLE
        return (max(0, length + start), length)
    window = parsed.range_for_length(length)
    return UNSATISFIABLE if window is None else window
