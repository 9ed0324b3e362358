"""The rules of the answers kept in memory (service/read/answers.py): what is stored, served and dropped."""
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_a_read_that_a_notification_of_its_user_overtook_is_not_kept():
    """The query's snapshot may predate the commit that notified: its answer may be the old one."""
    a = live()
    epoch = a.epoch
    a.changed("5,7")
    a.put(7, epoch, b"maybe old", None)
    assert a.get(7) is None
    a.put(7, a.epoch, b"new", None)
    assert a.get(7) == b"new"


def test_a_read_that_only_other_users_changes_overtook_is_kept():
    """Under a steady stream of writes every read overlaps some notification: only its own user's refuses it
    (the whole process's count refused every store in flight, so the hit rate fell with the write rate)."""
    a = live()
    epoch = a.epoch
    for other in range(100):
        a.changed(f"{1000 + other},{2000 + other}")
    a.put(7, epoch, b"seven", None)
    assert a.get(7) == b"seven"


def test_a_read_older_than_the_changes_remembered_is_not_kept(monkeypatch):
    monkeypatch.setattr(module, "CHANGES_KEPT", 3)
    a = live()
    epoch = a.epoch
    a.changed("7")  # the read's own user ...
    for other in range(3):
        a.changed(str(100 + other))  # ... forgotten behind three others
    assert 7 not in a.changed_at
    a.put(7, epoch, b"maybe old", None)
    assert a.get(7) is None
    a.put(8, a.epoch, b"read after", None)
    assert a.get(8) == b"read after"


@settings(max_examples=300)
@given(st.lists(st.one_of(st.tuples(st.just("read"), st.integers(0, 3)),
                          st.tuples(st.just("store"), st.integers(0, 9)),
                          st.tuples(st.just("change"), st.sets(st.integers(0, 3), min_size=1)),
                          st.tuples(st.just("everyone"), st.none()),
                          st.tuples(st.just("reset"), st.none())), max_size=40),
       st.integers(1, 4))
def test_no_answer_served_is_older_than_the_last_change_of_its_user(steps, kept):
    """A model of the database: each user's version moves on at every change; a read takes the version at its
    start (its snapshot) and stores it later, interleaved with changes. Whatever the order, `get` serves only the
    current version (or nothing)."""
    module.CHANGES_KEPT, saved = kept, module.CHANGES_KEPT
    try:
        a, version, reads = live(), dict.fromkeys(range(4), 0), []
        for kind, arg in steps:
            if kind == "read":
                reads.append((arg, a.epoch, version[arg]))
            elif kind == "store" and reads:
                user, epoch, seen = reads.pop(arg % len(reads))
                a.put(user, epoch, str(seen).encode(), None)
            elif kind == "change":
                for user in arg:
                    version[user] += 1
                a.changed(",".join(map(str, sorted(arg))))
            elif kind == "everyone":
                version = {user: n + 1 for user, n in version.items()}
                a.changed("*")
            elif kind == "reset":
                a.reset()
                beat(a)
            for user in version:
                assert a.get(user) in (None, str(version[user]).encode())
    finally:
        module.CHANGES_KEPT = saved


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
