"""The request's query string, read from the raw URI.

Twisted's ``request.args`` drops keys given without ``=``, so ``?download``
would vanish; here a bare key is kept with an empty value.  Otherwise the
parsing is Twisted's: ``&`` and ``;`` separate pairs, ``+`` is a space, and
values stay bytes (percent-escapes of any byte are kept as they are).
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from twisted.web.iweb import IRequest


def parse_query(query: bytes) -> dict[bytes, list[bytes]]:
    """``b"a=1&download"`` -> ``{b"a": [b"1"], b"download": [b""]}``."""
    parsed: dict[bytes, list[bytes]] = {}
    for pair in query.replace(b";", b"&").split(b"&"):
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        key = unquote_to_bytes(key.replace(b"+", b" "))
        parsed.setdefault(key, []).append(unquote_to_bytes(value.replace(b"+", b" ")))
    return parsed


def query_args(request: IRequest) -> dict[bytes, list[bytes]]:
    """The query's ``{key: [values]}``, bare keys included; parsed once per request."""
    parsed = getattr(request, "_couchtoken_query", None)
    if parsed is None:
        _, _, query = (request.uri or b"").partition(b"?")
        parsed = parse_query(query)
        request._couchtoken_query = parsed  # type: ignore[attr-defined]
    return parsed
