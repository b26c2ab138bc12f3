"""A PouchDB Server for development and tests, and a small blocking CouchDB admin client.

Not used by the service itself: ``make run`` and the test suite start a real
CouchDB-compatible server with it, on a free loopback port, with an admin
account, the way a deployment runs CouchDB.
"""

from __future__ import annotations

import base64
import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_NODE_MODULES = ROOT / "tests" / "node_modules"


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child get SIGTERM when this process dies (Linux; elsewhere None).

    For children started in their own session, which a terminal's Ctrl-C no
    longer reaches: should the parent be killed outright, they still stop.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)

    return preexec


class CouchAdmin:
    """Blocking admin access to a CouchDB server, for seeding and checking data."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 5984
        self.user = parts.username
        self.password = parts.password
        self.base_url = f"{parts.scheme}://{self.host}:{self.port}"
        self._auth = None
        if parts.username:
            pair = f"{parts.username}:{parts.password or ''}".encode()
            self._auth = "Basic " + base64.b64encode(pair).decode()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | BinaryIO | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        if self._auth:
            headers["Authorization"] = self._auth
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, _, raw = self.request(method, path, body)
        if status >= 400:
            raise RuntimeError(f"{method} {path} -> {status} {raw[:200]!r}")
        return json.loads(raw)

    @staticmethod
    def doc_path(db: str, docid: str) -> str:
        return f"/{quote(db, safe='')}/{quote(docid, safe='')}"

    def create_db(self, db: str) -> None:
        self.json("PUT", f"/{quote(db, safe='')}")

    def delete_db(self, db: str) -> None:
        self.request("DELETE", f"/{quote(db, safe='')}")

    def get(self, db: str, docid: str) -> dict[str, Any] | None:
        status, _, raw = self.request("GET", self.doc_path(db, docid))
        return json.loads(raw) if status == 200 else None

    def put(self, db: str, docid: str, doc: dict[str, Any]) -> str:
        """Create or replace a document (its current revision is looked up); returns the new rev."""
        current = self.get(db, docid)
        body = {k: v for k, v in doc.items() if k != "_rev"}
        if current is not None:
            body["_rev"] = current["_rev"]
            if "_attachments" not in body and "_attachments" in current:
                body["_attachments"] = current["_attachments"]
        return self.json("PUT", self.doc_path(db, docid), body)["rev"]

    def put_attachment(
        self,
        db: str,
        docid: str,
        name: str,
        data: bytes | BinaryIO,
        content_type: str = "application/octet-stream",
    ) -> str:
        """Store an attachment; ``data`` may be an open file, streamed rather than read whole."""
        current = self.get(db, docid)
        path = self.doc_path(db, docid) + "/" + "/".join(quote(p, safe="") for p in name.split("/"))
        if current is not None:
            path += "?rev=" + quote(current["_rev"], safe="")
        headers = {"Content-Type": content_type}
        if not isinstance(data, bytes):
            headers["Content-Length"] = str(os.fstat(data.fileno()).st_size)
        status, _, raw = self.request("PUT", path, data, headers, timeout=600)
        if status >= 400:
            raise RuntimeError(f"attachment PUT -> {status} {raw[:200]!r}")
        return json.loads(raw)["rev"]

    def delete(self, db: str, docid: str) -> None:
        current = self.get(db, docid)
        if current is not None:
            self.json("DELETE", self.doc_path(db, docid) + "?rev=" + quote(current["_rev"], safe=""))


class PouchDBServer:
    """``pouchdb-server`` from ``tests/node_modules``, with an admin account.

    With ``own_session`` it runs in a session of its own, which the terminal's
    Ctrl-C does not reach, so the caller decides when it stops (it still gets
    SIGTERM should the caller die).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        admin: tuple[str, str] | None = None,
        node_modules: Path = DEFAULT_NODE_MODULES,
        own_session: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.admin = admin or ("admin", secrets.token_urlsafe(12))
        self._script = node_modules / "pouchdb-server" / "bin" / "pouchdb-server"
        self._own_session = own_session
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        user, password = self.admin
        return f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 60) -> None:
        """Start (or restart, on the same data) and wait until it answers."""
        if not self._script.exists():
            raise RuntimeError(f"{self._script} is missing: run `npm ci --prefix tests --ignore-scripts`")
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("Node.js is needed to run PouchDB Server")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "server.out", "ab")  # noqa: SIM115 - handed to the child
        self._process = subprocess.Popen(
            [
                node,
                str(self._script),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--config",
                str(self.data_dir / "config.json"),
                "--no-stdout-logs",
            ],
            cwd=self.data_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=self._own_session,
            preexec_fn=die_with_parent() if self._own_session else None,
        )
        log.close()
        anonymous = CouchAdmin(f"http://127.0.0.1:{self.port}")
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"PouchDB Server exited; see {self.data_dir / 'server.out'}")
            try:
                status, _, _ = anonymous.request("GET", "/", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("PouchDB Server did not start in time")
            time.sleep(0.1)
        user, password = self.admin
        # While no admin exists ("admin party") anyone may create the first one.
        status, _, _ = anonymous.request(
            "PUT", f"/_config/admins/{quote(user, safe='')}", json.dumps(password).encode()
        )
        if status not in (200, 401, 403):
            raise RuntimeError(f"could not create the admin account ({status})")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """Stop abruptly, like a crash."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._process = None
