"""A test module's database with one large random attachment, stored once per module (PouchDB Server
takes a while over tens of MiB) and deleted after."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any


def random_attachment_db(
    admin: Any,
    prefix: str,
    token: str,
    attachment: str,
    size: int,
    content_type: str = "application/octet-stream",
    others: dict[str, tuple[bytes, str]] | None = None,
) -> Iterator[tuple[str, str]]:
    """Database ``<prefix>-<pid>``: its ``doc`` has ``download_token`` ``token``, ``size`` random bytes
    as ``attachment`` and the ``others`` ({name: (body, content type)}).

    For a module fixture to ``yield from``: yields (the database, the SHA-256 of the random bytes).
    """
    name = f"{prefix}-{os.getpid()}"
    admin.create_db(name)
    data = os.urandom(size)
    admin.put(name, "doc", {"download_token": token})
    admin.put_attachment(name, "doc", attachment, data, content_type)
    for other, (body, other_type) in (others or {}).items():
        admin.put_attachment(name, "doc", other, body, other_type)
    yield name, hashlib.sha256(data).hexdigest()
    admin.delete_db(name)
