"""``make run``: serve downloads, against ``$COUCHDB_URL`` or a seeded local PouchDB Server.

Without ``COUCHDB_URL`` a PouchDB Server is started in ``.run/pouchdb`` with
an admin account, a demo document with an attachment is stored, and a
working ``curl`` link is printed before the service starts on port 8000
(``PORT`` changes it).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from couchtoken.dev.pouchdb import ROOT, CouchAdmin, PouchDBServer

DEMO_DB, DEMO_DOC, DEMO_FILE = "demo", "hello", "hello.txt"


def seed(admin: CouchAdmin) -> str:
    """Store the demo document and attachment; returns its download token."""
    existing = admin.get(DEMO_DB, DEMO_DOC) if admin.request("GET", "/" + DEMO_DB)[0] == 200 else None
    if existing is None:
        if admin.request("GET", "/" + DEMO_DB)[0] == 404:
            admin.create_db(DEMO_DB)
        admin.put(DEMO_DB, DEMO_DOC, {"download_token": secrets.token_urlsafe(16)})
        admin.put_attachment(DEMO_DB, DEMO_DOC, DEMO_FILE, b"Hello from couchtoken!\n", "text/plain")
        existing = admin.get(DEMO_DB, DEMO_DOC)
    assert existing is not None
    return existing["download_token"]


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(0)  # runs the ``finally`` below, which stops PouchDB Server


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    port = os.environ.get("PORT", "8000")
    env = dict(os.environ)
    pouchdb = None
    if not env.get("COUCHDB_URL"):
        pouchdb = PouchDBServer(ROOT / ".run" / "pouchdb", port=5985, admin=("admin", "demo-password"))
        pouchdb.start()
        env["COUCHDB_URL"] = pouchdb.url
        token = seed(CouchAdmin(pouchdb.url))
        print(f"PouchDB Server on http://127.0.0.1:{pouchdb.port} (admin / demo-password)")
        print("Try:")
        print(f"  curl -i 'http://127.0.0.1:{port}/{DEMO_DB}/{DEMO_DOC}/{DEMO_FILE}?token={token}'")
        print(f"  curl -i 'http://127.0.0.1:{port}/{DEMO_DB}/{DEMO_DOC}/{DEMO_FILE}?token=wrong'")
    sys.stdout.flush()
    twist = Path(sys.executable).with_name("twist")
    command = [str(twist), "--log-format", "text", "couchtoken", "--port", f"tcp:{port}"]
    try:
        subprocess.run(command, env=env, check=False)
    except KeyboardInterrupt:
        pass
    finally:
        if pouchdb is not None:
            pouchdb.stop()


if __name__ == "__main__":
    main()
