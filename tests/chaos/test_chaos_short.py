"""The short chaos run of `make test`: a few faults under load (SIGKILL of a worker and of the busiest relay, a
PostgreSQL crash, Kafka cut for 10 s), then the invariant checker. `make chaos` runs the long plan."""
import pytest

from tests.chaos import run as chaos


@pytest.mark.chaos
@pytest.mark.timeout(240)
async def test_faults_under_load_lose_nothing_and_apply_nothing_twice(tmp_path):
    [row] = await chaos.run(chaos.SHORT, tmp_path, users=150, rate=30)
    print(chaos.table([row]))
    assert row.commands > 300 and row.injected == 4
    assert row.violations == {}
    assert (row.lost, row.double_effects) == (0, 0)
    assert max(row.recover) < 60
