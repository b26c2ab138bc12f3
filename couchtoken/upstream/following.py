"""Does a ``_changes`` feed still follow the database of its name?

Real CouchDB ends the feeds of a database when the database is deleted.
PouchDB Server does not: it keeps heartbeating the feed of a deleted
database, so the feed looks live but never reports a change of a new
database created under the same name.  Its database info has no identity
marker either (``instance_start_time`` is the server's start).  So on such
a server a feed asks for the database's latest change once a heartbeat
(``GET /<db>/_changes?descending=true&limit=1``) and compares it with the
latest change the feed has reported (or the first check saw):

- a seq *lower* than one the feed had already reported when the question
  was sent: the database went back, so it is a new one;
- the *same* seq with another document or revision: a new database that
  reached the same seq;
- a seq *above* everything the feed has reported, and still not reported
  by the next check a heartbeat later: the feed does not follow this
  database.

What this cannot tell apart is a database deleted and created again
between two checks whose latest change is exactly the old one (the same
seq, document and revision); its next change is noticed by the last rule.

Only the numeric prefix of a seq is compared (PouchDB's seqs are plain
integers; CouchDB 2+'s are ``"<n>-<opaque>"``, and across cluster nodes not
even comparable, which is why the check never runs on CouchDB).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


def seq_number(seq: object) -> int | None:
    """The numeric part of a ``seq`` (``12`` or ``"12-g1AAA..."``), or None if it has none."""
    if isinstance(seq, bool):
        return None
    if isinstance(seq, int):
        return seq
    if isinstance(seq, str):
        head = seq.split("-", 1)[0]
        if head.isascii() and head.isdigit():
            return int(head)
    return None


@attrs.frozen
class Change:
    """One change of a database: its seq's number, the document and its revision (None: no change yet)."""

    seq: int
    docid: str | None = None
    rev: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Change | None:
        """A ``_changes`` row (or ``{"last_seq": n}`` for an empty result); None without a numeric seq."""
        seq = seq_number(row.get("seq", row.get("last_seq")))
        if seq is None:
            return None
        docid = row.get("id")
        revs = row.get("changes")
        rev = None
        if isinstance(revs, list) and revs and isinstance(revs[0], Mapping):
            rev = revs[0].get("rev")
        return cls(
            seq=seq,
            docid=docid if isinstance(docid, str) else None,
            rev=rev if isinstance(rev, str) else None,
        )


class FollowCheck:
    """Judges, one database check at a time, whether a feed follows its database."""

    def __init__(self) -> None:
        self.known: Change | None = None  # the latest change the feed reported (or the first check saw)
        self._ahead: int | None = None  # a database seq the feed had not reported at the last check

    def reported(self, row: Mapping[str, Any]) -> None:
        """The feed reported this change row."""
        change = Change.from_row(row)
        if change is not None and (self.known is None or change.seq >= self.known.seq):
            self.known = change

    def judge(self, asked: Change | None, latest: Change) -> str | None:
        """None while the feed follows its database; else why it does not.

        ``asked`` is :attr:`known` when the check was sent, ``latest`` the
        database's latest change in the answer.
        """
        if self.known is None:  # the first check: what the feed starts from
            self.known = latest
            return None
        if asked is not None and latest.seq < asked.seq:
            return "the database was created again"
        if latest.seq == self.known.seq and latest != self.known:
            return "the database was created again"
        if self._ahead is not None and self.known.seq < self._ahead:
            return "the feed does not report the database's changes"
        self._ahead = latest.seq if latest.seq > self.known.seq else None
        return None
