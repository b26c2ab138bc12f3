"""Running Node.js for the JavaScript client's tests: where it is, and the flags it needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from couchtoken.dev.pouchdb import ROOT

NODE = shutil.which("node")
JS_CLIENT = ROOT / "clients" / "js"


def require_node() -> str:
    """The ``node`` executable; skips the test where it is missing (fails under CI, which has it)."""
    if NODE is None:
        if os.environ.get("CI"):
            pytest.fail("Node.js is missing: the suite needs it for PouchDB Server and the JS client")
        pytest.skip("Node.js is not installed")
    return NODE


def node_env() -> dict[str, str]:
    """The environment for ``node``: Node 18 shows ``globalThis.crypto`` only behind a flag."""
    env = dict(os.environ)
    version = subprocess.run([require_node(), "--version"], capture_output=True, text=True, check=True)
    major = int(re.match(r"v(\d+)", version.stdout).group(1))
    if major < 19:
        env["NODE_OPTIONS"] = (env.get("NODE_OPTIONS", "") + " --experimental-global-webcrypto").strip()
    return env
