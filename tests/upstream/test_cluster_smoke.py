"""A 3-node CouchDB cluster from the release (``tests/couchdb_release.py``) forms and replicates.

Runs only with ``COUCHTOKEN_TEST_COUCHDB_START`` (the start-couchdb script): the
helper later cluster tests build on must keep working.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.couchdb_release import START_ENV, start_cluster

pytestmark = pytest.mark.skipif(not os.environ.get(START_ENV), reason=f"needs {START_ENV}")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_a_database_created_on_node1_is_read_on_node3(tmp_path):
    cluster = start_cluster(Path(os.environ[START_ENV]).expanduser(), tmp_path)
    pids = [node.pid for node in cluster.nodes]
    epmd = cluster.epmd_pid
    try:
        assert all(pids) and len(set(pids)) == 3
        assert epmd is not None, "the cluster's own epmd was not found"
        node1, _, node3 = (node.client() for node in cluster.nodes)
        db = f"ct-cluster-{uuid.uuid4().hex[:8]}"
        node1.create_db(db)
        node1.put(db, "doc", {"download_token": "t"})
        assert node3.get(db, "doc")["download_token"] == "t"
        assert node3.json("GET", f"/{db}")["cluster"]["n"] == 3
        assert {"_users", "_replicator", "_global_changes"} <= set(node3.json("GET", "/_all_dbs"))
    finally:
        cluster.stop()
    assert not any(_running(pid) for pid in pids)
    assert not _running(epmd)
