"""The CouchDB a benchmark runs against: ``--couchdb pouchdb|release|URL``.

- ``pouchdb`` (the default): a PouchDB Server from ``tests/node_modules``;
- ``release``: a real Apache CouchDB 3.5 single node, started with
  ``--couchdb-start`` (default ``../shared/couchdb/start-couchdb`` beside the
  repository) in a temporary directory; ``start-couchdb`` waits for the node
  with ``curl``;
- a URL with admin credentials: a server that runs already.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from couchtoken.dev.pouchdb import PouchDBServer  # noqa: E402
from tests.couchdb_release import CouchDBRelease  # noqa: E402

DEFAULT_START = ROOT.parent / "shared" / "couchdb" / "start-couchdb"


def _problem(choice: str) -> str | None:
    """Why ``choice`` cannot be used here (never quoting a URL's credentials), or None."""
    if choice == "pouchdb":
        return None
    if choice == "release":
        if shutil.which("curl") is None:
            return "release needs curl (start-couchdb waits for the node with it): apt-get install curl"
        return None
    parts = urlsplit(choice)
    if parts.scheme in ("http", "https") and parts.hostname:
        return None
    return (
        "takes pouchdb, release or an admin URL (http://admin:pass@host:5984), "
        f"not {re.sub(r'//[^/@]*@', '//', choice)!r}"
    )


def server_choice(value: str) -> str:
    """The ``--couchdb`` argument type: refuses a bad value before anything starts."""
    problem = _problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--couchdb",
        default="pouchdb",
        type=server_choice,
        help="pouchdb (default), release (a real CouchDB 3.5 node started for the run), or an admin URL",
    )
    parser.add_argument(
        "--couchdb-start", default=str(DEFAULT_START), help="the start-couchdb script, for --couchdb release"
    )


def describe(choice: str) -> str:
    """A name for the report (never the URL's credentials)."""
    if choice in ("pouchdb", "release"):
        return {"pouchdb": "PouchDB Server 4.2", "release": "Apache CouchDB 3.5"}[choice]
    return "CouchDB at " + choice.rsplit("@", 1)[-1]


@contextlib.contextmanager
def couchdb_server(choice: str, workdir: Path, start_script: str = str(DEFAULT_START)) -> Iterator[str]:
    """Start (or name) the server; yields its admin URL; stops what it started."""
    problem = _problem(choice)
    if problem:
        raise ValueError(f"--couchdb {problem}")
    if choice == "pouchdb":
        pouchdb = PouchDBServer(workdir / "pouchdb")
        pouchdb.start()
        try:
            yield pouchdb.url
        finally:
            pouchdb.stop()
    elif choice == "release":
        couchdb = CouchDBRelease(start_script, workdir / "couchdb")
        couchdb.start()
        try:
            couchdb.setup_for_tests()
            yield couchdb.url
        finally:
            couchdb.stop()
    else:
        yield choice
