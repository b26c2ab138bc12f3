"""Documents with awkward names, seeded for the link helpers to download."""

from __future__ import annotations

import os

import attrs
import pytest

TOKEN = "client-token-0123456789"


@attrs.frozen
class StoredFile:
    docid: str
    attachment: str
    content: bytes


# A slash in the doc id and in the attachment name, "+", space, é (NFC and NFD), "?", "#", "%".
AWKWARD = [
    ("user/42", "photos/2024/a+b c é?#.bin"),
    ("a+b c é?#", "plain.txt"),
    ("café", "café.txt"),
    ("café", "cafe\u0301.txt"),
    ("cafe\u0301", "note.txt"),
    ("odd ~!*'()%20", "100% ~!*'();,=&@$[].txt"),
    ("emoji \U0001f600", "dir/\U0001f600/ü.txt"),
]


@pytest.fixture
def awkward_files(admin, db) -> list[StoredFile]:
    """Each awkward (doc id, attachment) stored with different random bytes, all under ``TOKEN``."""
    files = []
    for docid, attachment in AWKWARD:
        content = os.urandom(300) + bytes(range(256))
        admin.put(db, docid, {"download_token": TOKEN})
        admin.put_attachment(db, docid, attachment, content)
        files.append(StoredFile(docid, attachment, content))
    return files
