"""``make run``: serve downloads, against ``$COUCHDB_URL`` or a seeded local PouchDB Server.

Without ``COUCHDB_URL`` a PouchDB Server is started in ``.run/pouchdb`` with
an admin account, a demo document with an attachment is stored, and a
working ``curl`` link is printed before the service starts on port 8000
(``PORT`` changes it; ``COUCHTOKEN_DEMO_POUCHDB_PORT`` and
``COUCHTOKEN_DEMO_POUCHDB_DIR`` move PouchDB Server from 5985 and
``.run/pouchdb``).

Ctrl-C (SIGINT) and SIGTERM stop it the way SIGTERM stops ``twist
couchtoken``: the port closes, running downloads finish (up to
``--drain-timeout``), then PouchDB Server stops and the demo exits 0.  The
service and PouchDB Server run in sessions of their own, so the terminal's
Ctrl-C reaches only the demo, which stops them in that order.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from couchtoken.dev.pouchdb import ROOT, CouchAdmin, PouchDBServer, die_with_parent

DEMO_DB, DEMO_DOC, DEMO_FILE = "demo", "hello", "hello.txt"
POUCHDB_PORT = 5985


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


class Stopper:
    """SIGINT and SIGTERM: once the service runs, SIGTERM it so it drains; before, just exit.

    Only the first signal counts: under ``make`` one stop may arrive twice
    (a SIGTERM to the process group reaches the demo, and make passes it on).
    """

    def __init__(self) -> None:
        self.service: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.stop)

    def stop(self, signum: int, frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        name = signal.Signals(signum).name
        if self.service is None:
            print(f"{name}: stopping", flush=True)
            sys.exit(0)  # runs main's ``finally``, which stops PouchDB Server
        print(f"{name}: draining running downloads (--drain-timeout), then stopping", flush=True)
        self.service.send_signal(signal.SIGTERM)


def main() -> None:
    stopper = Stopper()
    stopper.install()
    port = os.environ.get("PORT", "8000")
    env = dict(os.environ)
    pouchdb = None
    code = 0
    try:
        if not env.get("COUCHDB_URL"):
            pouchdb = PouchDBServer(
                Path(env.get("COUCHTOKEN_DEMO_POUCHDB_DIR") or ROOT / ".run" / "pouchdb"),
                port=int(env.get("COUCHTOKEN_DEMO_POUCHDB_PORT") or POUCHDB_PORT),
                admin=("admin", "demo-password"),
                own_session=True,
            )
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
        stopper.service = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent()
        )
        code = stopper.service.wait()
        if stopper.stopping and code == -signal.SIGTERM:
            code = 0  # stopped before it had installed its exit-0 SIGTERM handler
    finally:
        if pouchdb is not None:
            pouchdb.stop()
    if stopper.stopping:
        print("Stopped", flush=True)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
