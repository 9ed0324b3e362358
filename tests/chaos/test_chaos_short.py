"""The short chaos run of `make test`: a few faults under load (SIGKILL of a worker and of the busiest relay, a
PostgreSQL crash, Kafka cut for 10 s), then the invariant checker. `make chaos` runs the long plan."""
import pytest

from tests.chaos import run as chaos

# Violations the checker finds today, in the write path (issue 8; helper "write" is on it): the test fails on any
# other violation, and fails too (strict) once these are fixed, so that this list is emptied then.
KNOWN = {
    "publications differ": "a stored result published again (a publisher's duplicate) is re-serialized from "
                           "jsonb: other bytes than its first publication (service/write/batch.py answer_duplicate)",
    "a dead letter's result was stored": "a dead letter with a readable command_id gets its rejected result "
                                         "stored, so the id is taken; the contract says published, not stored "
                                         "(service/write/batch.py dead_letter -> finish(store=True))",
}


class KnownDefect(AssertionError):
    pass


@pytest.mark.chaos
@pytest.mark.timeout(240)
@pytest.mark.xfail(strict=True, raises=KnownDefect, reason="; ".join(KNOWN.values()))
async def test_faults_under_load_lose_nothing_and_apply_nothing_twice(tmp_path):
    [row] = await chaos.run(chaos.SHORT, tmp_path, users=150, rate=30)
    print(chaos.table([row]))
    assert row.commands > 300 and row.injected == 4
    assert (row.lost, row.double_effects) == (0, 0)
    assert max(row.recover) < 60
    unknown = {name: [v for v in found if v[0] not in KNOWN] for name, found in row.violations.items()}
    assert {name: found for name, found in unknown.items() if found} == {}
    known = {v[0] for found in row.violations.values() for v in found}
    if known:
        raise KnownDefect(sorted(known))
