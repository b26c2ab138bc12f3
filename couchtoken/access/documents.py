"""The part of a CouchDB document a download needs, small enough to cache."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from couchtoken.access.attachments import AttachmentInfo
from couchtoken.access.tokens import document_tokens, token_matches


@attrs.frozen(repr=False)
class DocumentSummary:
    """A document's usable token(s), revision and attachment metadata.

    A document without a usable token has ``tokens == ()`` and opens nothing,
    so it keeps no attachment metadata either.  ``size`` is what the summary
    holds in memory, in bytes (an estimate that errs high), for the cache's
    byte bound.
    """

    tokens: tuple[str, ...]
    rev: str | None
    attachments: Mapping[str, AttachmentInfo] = attrs.field(repr=False)
    size: int = attrs.field(default=0, eq=False, repr=False)

    @classmethod
    def from_document(cls, document: Mapping[str, Any], token_field: Sequence[str]) -> DocumentSummary:
        tokens = document_tokens(document, token_field)
        stubs = document.get("_attachments")
        attachments = {}
        if tokens and isinstance(stubs, Mapping):  # without a token no check ever reads them
            attachments = {
                name: AttachmentInfo.from_stub(stub)
                for name, stub in stubs.items()
                if isinstance(stub, Mapping)
            }
        rev = document.get("_rev")
        rev = rev if isinstance(rev, str) else None
        return cls(tokens=tokens, rev=rev, attachments=attachments, size=_size(tokens, rev, attachments))

    def accepts(self, offered: bytes | None) -> bool:
        """Whether ``offered`` equals one of the tokens (each compared in constant time)."""
        matched = False
        for token in self.tokens:
            matched |= token_matches(token, offered)
        return matched

    def __repr__(self) -> str:  # never show tokens
        counts = f"tokens={len(self.tokens)}, attachments={len(self.attachments)}"
        return f"DocumentSummary(rev={self.rev!r}, {counts})"


# Python's own overhead per object and per dict slot (CPython 3.11, 64-bit), rounded up.
_SUMMARY_BYTES = 1000  # the summary, its tuple and a small dict
_PER_ATTACHMENT_BYTES = 240  # the AttachmentInfo, its ints, and the dict slot and its share of resizes


def _size(tokens: tuple[str, ...], rev: str | None, attachments: Mapping[str, AttachmentInfo]) -> int:
    """Bytes a summary holds, from the sizes of its strings plus fixed overheads (errs high)."""
    size = _SUMMARY_BYTES + sum(sys.getsizeof(token) for token in tokens) + sys.getsizeof(rev)
    for name, info in attachments.items():
        size += _PER_ATTACHMENT_BYTES + sys.getsizeof(name) + sys.getsizeof(info.content_type)
        size += sys.getsizeof(info.digest) + sys.getsizeof(info.encoding)
    return size
