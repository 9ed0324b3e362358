"""The rules of the answers kept in memory (service/read/answers.py): what is stored, served and dropped."""
import time
from datetime import UTC, datetime, timedelta

import pytest

from service.read import answers as module
from service.read.answers import ENTRY_BYTES, UserAnswers, earliest_expiry


def beat(a: UserAnswers, skew: float = 0.0) -> None:
    """A heartbeat sent and answered now, the database's clock `skew` seconds ahead of this host's."""
    now = module.time.monotonic()  # the module's clock, moved on by a test or not
    a.alive(now, datetime.fromtimestamp(module.time.time(), UTC) + timedelta(seconds=skew), now)


def live(budget: int = 10_000) -> UserAnswers:
    a = UserAnswers(budget)
    beat(a)
    return a


class Clock:
    """module.time with time.monotonic moved on (and the wall clock `stepped` beside that): the rest of the
    process keeps the real one."""

    def __init__(self, ahead: float, stepped: float = 0.0):
        self.ahead, self.stepped = ahead, stepped

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    def time(self) -> float:
        return time.time() + self.ahead + self.stepped


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


def test_nothing_is_kept_or_served_unless_the_listeners_last_heartbeat_left_lately(monkeypatch):
    a = UserAnswers(10_000)
    a.put(7, a.epoch, b"seven", None)
    assert a.get(7) is None and not a.entries  # never alive: not stored
    sent = time.monotonic() - module.LIVENESS_SECONDS + 0.2
    a.alive(sent, datetime.now(UTC), time.monotonic())  # answered now, but sent a while ago: lapses from `sent`
    a.put(7, a.epoch, b"seven", None)
    assert a.get(7) == b"seven"
    monkeypatch.setattr(module, "time", Clock(0.25))
    assert a.get(7) is None  # kept, but not served: a notification may be stuck


def test_no_answer_is_served_past_its_maximum_age(monkeypatch):
    a = live()
    a.put(7, a.epoch, b"seven", None)
    monkeypatch.setattr(module, "time", Clock(module.MAX_AGE_SECONDS + 1))
    beat(a)
    assert a.get(7) is None and not a.entries


@pytest.mark.parametrize(("expires_in", "after"), [(None, module.MAX_AGE_SECONDS + 1), (5.0, 6.0)])
def test_a_step_back_of_this_hosts_wall_clock_keeps_no_answer_longer(monkeypatch, expires_in, after):
    """An answer's deadlines (its maximum age; its expiry, in the database's clock) run on the monotonic clock:
    the host's wall clock set back an hour (NTP, an operator) after the answer was kept stretches neither. The
    expiry is checked `after` 6 s, inside the maximum age, so that only the expiry's deadline can drop it."""
    user = 7
    a = live()
    a.put(user, a.epoch, b"kept", None if expires_in is None else datetime.now(UTC) + timedelta(seconds=expires_in))
    later = Clock(after, stepped=-3600)
    monkeypatch.setattr(module, "time", later)
    database_now = datetime.now(UTC) + timedelta(seconds=later.ahead)  # the database's clock did not step
    a.alive(later.monotonic(), database_now, later.monotonic())
    assert a.get(user) is None


def test_losing_the_listener_drops_everything_and_refuses_reads_in_flight():
    a = live()
    epoch = a.epoch
    a.put(7, epoch, b"seven", None)
    a.reset()
    beat(a)  # listening again
    assert a.get(7) is None
    a.put(8, epoch, b"read before the loss", None)
    assert a.get(8) is None


@pytest.mark.parametrize("skew", [0.0, -30.0, 30.0])
def test_an_answer_is_not_served_from_its_earliest_expiry_on_in_the_databases_clock(skew):
    a = UserAnswers(10_000)
    beat(a, skew)
    soon = datetime.now(UTC) + timedelta(seconds=skew + 0.2)  # 0.2 s from now, said in the database's clock
    a.put(7, a.epoch, b"with a ttl", soon)
    assert a.get(7) == b"with a ttl"
    time.sleep(0.25)
    beat(a, skew)
    assert a.get(7) is None and 7 not in a.entries


def test_earliest_expiry_is_the_first_membership_to_end():
    t = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [{"expires_at": None}, {"expires_at": t + timedelta(hours=1)}, {"expires_at": t}]
    assert earliest_expiry(rows) == t
    assert earliest_expiry([{"expires_at": None}]) is None and earliest_expiry([]) is None


@pytest.mark.parametrize("kept", [0, 1, 3])
def test_at_most_the_budget_is_kept_the_least_recently_served_out_first(kept):
    a = live(kept * (ENTRY_BYTES + 1))  # room for `kept` bodies of one byte
    for user in range(1, 4):
        a.put(user, a.epoch, str(user).encode(), None)
    if kept == 3:
        assert a.get(1) == b"1"  # served: the most recent now
        a.put(4, a.epoch, b"4", None)
        assert sorted(a.entries) == [1, 3, 4]
    else:
        assert list(a.entries) == list(range(1, 4))[3 - kept:]
    assert a.used == len(a.entries) * (ENTRY_BYTES + 1) <= a.budget


def test_an_answer_kept_again_or_dropped_gives_its_bytes_back():
    a = live()
    a.put(7, a.epoch, b"x" * 100, None)
    a.put(7, a.epoch, b"y" * 10, None)
    assert a.used == ENTRY_BYTES + 10
    a.changed("7")
    assert a.used == 0
    a.put(8, a.epoch, b"z" * (a.budget), None)  # larger than the budget: not kept, nothing evicted for it
    assert not a.entries and a.used == 0
