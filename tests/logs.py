"""Reading what the service logged (events from the ``logged`` fixture)."""

from __future__ import annotations

from typing import Any

ACCESS_NAMESPACE = "couchtoken.access"


def access_lines(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The access-log events among ``events``: one per answered request, its fields included."""
    return [e for e in events if e.get("log_namespace") == ACCESS_NAMESPACE]
