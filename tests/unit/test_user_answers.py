"""The rules of the answers kept in memory (service/read/answers.py): what is stored, served and dropped."""
import time
from datetime import UTC, datetime, timedelta

import pytest

from service.read import answers as module
from service.read.answers import UserAnswers, earliest_expiry


def live(size: int = 10) -> UserAnswers:
    a = UserAnswers(size)
    a.alive()
    return a


def test_an_answer_read_is_served_until_a_notification_names_its_user():
    a = live()
    a.put(7, a.epoch, b"seven", None)
    a.put(8, a.epoch, b"eight", None)
    assert a.get(7) == b"seven"
    a.changed("1,7,9")
    assert a.get(7) is None and a.get(8) == b"eight"


def test_everyone_and_a_payload_it_cannot_read_drop_every_answer():
    for payload in ("*", "7,x"):
        a = live()
        a.put(7, a.epoch, b"seven", None)
        a.put(8, a.epoch, b"eight", None)
        a.changed(payload)
        assert a.get(7) is None and a.get(8) is None


def test_a_read_that_a_notification_overtook_is_not_kept():
    """The query's snapshot may predate the commit that notified: its answer may be the old one."""
    a = live()
    epoch = a.epoch
    a.changed("123")  # anyone's: whose change the read saw is not known
    a.put(7, epoch, b"maybe old", None)
    assert a.get(7) is None
    a.put(7, a.epoch, b"new", None)
    assert a.get(7) == b"new"


def test_nothing_is_kept_or_served_unless_the_listener_proved_itself_lately(monkeypatch):
    a = UserAnswers(10)
    a.put(7, a.epoch, b"seven", None)
    assert a.get(7) is None and not a.entries  # never alive: not stored
    a.alive()
    a.put(7, a.epoch, b"seven", None)
    assert a.get(7) == b"seven"
    later = time.monotonic() + module.LIVENESS_SECONDS + 0.01
    monkeypatch.setattr(module.time, "monotonic", lambda: later)
    assert a.get(7) is None  # kept, but not served: a notification may be stuck


def test_losing_the_listener_drops_everything_and_refuses_reads_in_flight():
    a = live()
    epoch = a.epoch
    a.put(7, epoch, b"seven", None)
    a.reset()
    a.alive()  # listening again
    assert a.get(7) is None
    a.put(8, epoch, b"read before the loss", None)
    assert a.get(8) is None


def test_an_answer_is_not_served_from_its_earliest_expiry_on():
    a = live()
    soon = datetime.now(UTC) + timedelta(seconds=0.2)
    a.put(7, a.epoch, b"with a ttl", soon)
    assert a.get(7) == b"with a ttl"
    time.sleep(0.25)
    assert a.get(7) is None and 7 not in a.entries


def test_earliest_expiry_is_the_first_membership_to_end():
    t = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [{"expires_at": None}, {"expires_at": t + timedelta(hours=1)}, {"expires_at": t}]
    assert earliest_expiry(rows) == t
    assert earliest_expiry([{"expires_at": None}]) is None and earliest_expiry([]) is None


@pytest.mark.parametrize("size", [0, 1, 3])
def test_at_most_size_answers_are_kept_the_least_recently_served_out_first(size):
    a = live(size)
    for user in range(1, 4):
        a.put(user, a.epoch, str(user).encode(), None)
    if size == 3:
        assert a.get(1) == b"1"  # served: the most recent now
        a.put(4, a.epoch, b"4", None)
        assert sorted(a.entries) == [1, 3, 4]
    else:
        assert list(a.entries) == list(range(1, 4))[3 - size:]
