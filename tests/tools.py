"""Programs from outside Python that some tests need: skipped with the reason locally, a failure under CI."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def require_tool(name: str, package: str) -> str:
    """The path of ``name``; skips (fails under CI, where ``.ci/run`` installs ``package``) if missing."""
    path = shutil.which(name)
    if path is None:
        _missing(f"{name} is not installed (apt-get install {package})")
    return path


def require_curl_with_http2() -> str:
    curl = require_tool("curl", "curl")
    if "HTTP2" not in subprocess.run([curl, "-V"], capture_output=True, text=True).stdout:
        _missing("this curl has no HTTP/2 support (Debian's curl has it)")
    return curl


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason + "; .ci/run installs it under CI")
    pytest.skip(reason)
