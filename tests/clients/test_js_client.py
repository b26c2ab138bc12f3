"""The JavaScript client (clients/js/couchtoken.js): node's tests against the service; the URLs Python makes.

The service and the CouchDB server (PouchDB Server, or the one named by
``COUCHTOKEN_TEST_COUCHDB_URL``) are the suite's own fixtures; the documents
are seeded here and handed to ``node --test`` in a JSON file, with the bytes
each download must return.  ``node --test`` also runs the module's unit tests.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import threads

from couchtoken.client import auth_headers, download_url, signed_url
from tests.clients import strategies
from tests.clients.conftest import TOKEN
from tests.clients.nodejs import JS_CLIENT, node_env, require_node


def tap_counts(output: str) -> dict[str, int]:
    """``# tests 12``, ``# pass 12``... from node's TAP summary."""
    return {key: int(value) for key, value in re.findall(r"^# (\w+) (\d+)$", output, re.M)}


def basic_authorization(admin) -> str | None:
    """The admin's ``Authorization`` header, so node can write documents the way an app does."""
    if not admin.user:
        return None
    return "Basic " + base64.b64encode(f"{admin.user}:{admin.password or ''}".encode()).decode()


def run_node_tests(fixture_path) -> tuple[subprocess.CompletedProcess, dict[str, int]]:
    files = sorted(str(path) for path in (JS_CLIENT / "test").glob("*.test.js"))
    assert files, "no JS test files found"
    env = {**node_env(), "COUCHTOKEN_JS_FIXTURE": str(fixture_path)}
    result = subprocess.run(
        [require_node(), "--test", "--test-reporter=tap", *files],
        cwd=JS_CLIENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return result, tap_counts(result.stdout)


@pytest_twisted.ensureDeferred
async def test_node_test_runs_the_js_module_against_the_service(service, admin, db, awkward_files, tmp_path):
    require_node()
    fixture = {
        "base": service.base_url,
        "db": db,
        "token": TOKEN,
        "couchdb": {"url": admin.base_url, "authorization": basic_authorization(admin)},
        "files": [
            {"docId": f.docid, "attachment": f.attachment, "base64": base64.b64encode(f.content).decode()}
            for f in awkward_files
        ],
    }
    fixture_path = tmp_path / "fixture.json"
    fixture_path.write_text(json.dumps(fixture), encoding="utf-8")
    # In a thread: the service runs on this process's reactor and must keep answering.
    result, counts = await threads.deferToThread(run_node_tests, fixture_path)
    output = result.stdout[-20000:] + result.stderr[-5000:]
    print(output)
    assert result.returncode == 0, output
    assert counts.get("tests", 0) > 0, output
    assert counts.get("pass") == counts["tests"], counts
    # Nothing skipped: a skipped suite shows only as "# SKIP", not in the counts.
    assert counts.get("skipped", 0) == 0 and "# SKIP" not in result.stdout, output
    assert "ok 1 - awkward names download byte-exact with ?token=" in result.stdout, output


class NodeLinks:
    """The JS module in one long-lived node process, called over its stdin and stdout."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [require_node(), str(Path(__file__).with_name("links_over_stdio.mjs"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=node_env(),
            text=True,
            encoding="utf-8",
        )

    def call(self, fn: str, *args: object) -> dict:
        """``{"value": ...}`` or ``{"error": "RangeError", ...}``."""
        self._process.stdin.write(json.dumps({"fn": fn, "args": args}) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        assert line, f"node exited with {self._process.wait(timeout=10)}"
        return json.loads(line)

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=10)


@pytest.fixture(scope="module")
def node_links():
    links = NodeLinks()
    yield links
    links.close()


def python_answer(make: Callable[[], object]) -> dict:
    try:
        return {"value": make()}
    except (ValueError, TypeError) as refused:
        return {"error": type(refused).__name__, "message": str(refused)}


def same(python: dict, js: dict) -> bool:
    """The same value, or both refused (the error types differ by language)."""
    return python.get("value") == js.get("value") and ("error" in python) == ("error" in js)


any_token = st.one_of(strategies.token, strategies.anything)
any_name = st.one_of(strategies.anything, strategies.docid)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(strategies.database, strategies.anything),
    any_name,
    st.one_of(strategies.attachment, strategies.anything),
    st.one_of(st.none(), any_token),
    st.booleans(),
)
def test_js_and_python_give_the_same_download_links(node_links, db, docid, attachment, token, download):
    names = ("https://files.example/", db, docid, attachment, token)
    python = python_answer(lambda: download_url(*names, download=download))
    js = node_links.call("downloadUrl", *names, {"download": download})
    assert same(python, js), (python, js)
    if token is not None:
        python = python_answer(lambda: auth_headers(token))
        js = node_links.call("headerInit", token)
        assert same({"value": {"headers": python["value"]}} if "value" in python else python, js), (
            python,
            js,
        )


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    strategies.database,
    strategies.docid,  # refused names are the download test's job (the same checks)
    strategies.attachment,
    st.one_of(strategies.signing_token, any_token),
    st.one_of(st.integers(0, 10**12 - 1), st.integers(-(10**13), 10**13)),
    st.booleans(),
)
def test_js_and_python_give_the_same_signed_links(
    node_links, db, docid, attachment, token, expires, download
):
    names = ("https://files.example", db, docid, attachment, token, expires)
    python = python_answer(lambda: signed_url(*names, download=download))
    js = node_links.call("signedUrl", *names, {"download": download})
    assert same(python, js), (python, js)


def test_the_comparison_sees_a_difference(node_links):
    """Guards the property tests above: a JS answer that differs is noticed."""
    python = python_answer(lambda: download_url("http://h", "db", "d", "!"))
    assert python == {"value": "http://h/db/d/%21"}
    assert same(python, node_links.call("downloadUrl", "http://h", "db", "d", "!"))
    assert not same(python, {"value": "http://h/db/d/!"})
    assert not same(python, {"error": "RangeError"})
