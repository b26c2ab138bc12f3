"""Find a document's download token and compare it with the one offered."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Any


def document_token(document: Mapping[str, Any], field: Sequence[str]) -> str | None:
    """The token at the dotted ``field`` path, or None when there is no usable one.

    Usable means a non-empty string: a missing field, ``null``, ``""``, a
    number or an object all open nothing.
    """
    value: Any = document
    for key in field:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    if isinstance(value, str) and value:
        return value
    return None


def token_matches(expected: str | None, offered: bytes | None) -> bool:
    """Constant-time comparison; nothing matches a missing or empty token."""
    if not expected or not offered:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), offered)
