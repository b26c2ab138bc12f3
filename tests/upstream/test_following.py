"""FollowCheck: telling from a database's latest change whether a feed still follows it."""

from __future__ import annotations

import pytest

from couchtoken.upstream.following import Change, FollowCheck, seq_number


def row(seq, docid="doc", rev="1-a"):
    return {"seq": seq, "id": docid, "changes": [{"rev": rev}]}


@pytest.mark.parametrize(
    "seq,number",
    [
        (7, 7),
        ("12-g1AAAA", 12),
        ("3", 3),
        (True, None),
        ("now", None),
        (None, None),
        ("-1", None),
        ("٣", None),
    ],
)
def test_seq_numbers(seq, number):
    assert seq_number(seq) == number


def test_a_change_from_rows_and_empty_answers():
    assert Change.from_row(row(3, "a", "2-b")) == Change(3, "a", "2-b")
    assert Change.from_row({"last_seq": 0}) == Change(0)
    assert Change.from_row({"seq": "x", "id": "a"}) is None
    assert Change.from_row({"seq": 1, "id": 5, "changes": "?"}) == Change(1)


def test_a_feed_that_reports_every_change_keeps_following():
    check = FollowCheck()
    assert check.judge(None, Change(5, "a", "1-x")) is None  # the first check: the baseline
    for seq in range(6, 10):
        asked = check.known
        check.reported(row(seq, f"d{seq}"))
        assert check.judge(asked, Change(seq, f"d{seq}", "1-a")) is None
    assert check.known == Change(9, "d9", "1-a")


def test_an_answer_from_before_a_reported_change_is_no_loss():
    check = FollowCheck()
    check.judge(None, Change(5, "a", "1-x"))
    asked = check.known
    check.reported(row(6))  # reported while the check was on its way
    assert check.judge(asked, Change(5, "a", "1-x")) is None


def test_a_seq_lower_than_asked_is_a_new_database():
    check = FollowCheck()
    check.judge(None, Change(5, "a", "1-x"))
    assert check.judge(check.known, Change(2, "b", "1-y")) == "the database was created again"
    assert check.judge(check.known, Change(0)) == "the database was created again"


def test_the_same_seq_with_another_change_is_a_new_database():
    check = FollowCheck()
    check.judge(None, Change(2, "doc", "2-old"))
    assert check.judge(check.known, Change(2, "doc", "2-new")) == "the database was created again"


def test_a_change_the_feed_does_not_report_by_the_next_check_is_a_lost_feed():
    check = FollowCheck()
    check.judge(None, Change(5, "a", "1-x"))
    assert check.judge(check.known, Change(6, "b", "1-y")) is None  # maybe still on its way
    assert (
        check.judge(check.known, Change(6, "b", "1-y")) == "the feed does not report the database's changes"
    )


def test_a_change_reported_by_the_next_check_is_fine():
    check = FollowCheck()
    check.judge(None, Change(5, "a", "1-x"))
    assert check.judge(check.known, Change(6, "b", "1-y")) is None
    check.reported(row(6, "b", "1-y"))
    assert check.judge(check.known, Change(6, "b", "1-y")) is None
