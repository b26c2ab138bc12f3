"""The part of a CouchDB document a download needs, small enough to cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from couchtoken.access.attachments import AttachmentInfo
from couchtoken.access.tokens import document_tokens, token_matches


@attrs.frozen(repr=False)
class DocumentSummary:
    """A document's usable token(s), revision and attachment metadata.

    A document without a usable token has ``tokens == ()`` and opens nothing.
    """

    tokens: tuple[str, ...]
    rev: str | None
    attachments: Mapping[str, AttachmentInfo] = attrs.field(repr=False)

    @classmethod
    def from_document(cls, document: Mapping[str, Any], token_field: Sequence[str]) -> DocumentSummary:
        stubs = document.get("_attachments")
        attachments = {}
        if isinstance(stubs, Mapping):
            attachments = {
                name: AttachmentInfo.from_stub(stub)
                for name, stub in stubs.items()
                if isinstance(stub, Mapping)
            }
        rev = document.get("_rev")
        return cls(
            tokens=document_tokens(document, token_field),
            rev=rev if isinstance(rev, str) else None,
            attachments=attachments,
        )

    def accepts(self, offered: bytes | None) -> bool:
        """Whether ``offered`` equals one of the tokens (each compared in constant time)."""
        matched = False
        for token in self.tokens:
            matched |= token_matches(token, offered)
        return matched

    def __repr__(self) -> str:  # never show tokens
        counts = f"tokens={len(self.tokens)}, attachments={len(self.attachments)}"
        return f"DocumentSummary(rev={self.rev!r}, {counts})"
