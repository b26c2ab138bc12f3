"""Find a document's download token and compare it with the one offered."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Any


def document_tokens(document: Mapping[str, Any], field: Sequence[str]) -> tuple[str, ...]:
    """The usable tokens at the dotted ``field`` path: none, one, or several.

    A non-empty string is one token.  A list holds several (for rotation: a
    new token can be rolled out before the old one is retired); its items
    that are not non-empty strings are ignored, and an empty list opens
    nothing.  A missing field, ``null``, ``""``, a number or an object open
    nothing either.
    """
    value: Any = document
    for key in field:
        if not isinstance(value, Mapping) or key not in value:
            return ()
        value = value[key]
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list):
        return tuple(item for item in value if isinstance(item, str) and item)
    return ()


def token_matches(expected: str | None, offered: bytes | None) -> bool:
    """Constant-time comparison; nothing matches a missing or empty token."""
    if not expected or not offered:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), offered)
