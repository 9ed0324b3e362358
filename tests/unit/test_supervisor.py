"""The healing of `make run`: a process that dies is started again after a pause that grows to 30 s."""
import sys

from service.dev.supervisor import Child


def test_a_process_that_keeps_dying_is_restarted_after_pauses_growing_to_30_s_and_reset_when_it_stayed_up(caplog):
    child = Child("dies", {}, argv=[sys.executable, "-c", "raise SystemExit(3)"])
    now = 1000.0
    child.start(now)
    pauses = []
    for _ in range(8):
        child.proc.wait(30)
        child.check(now)  # the death is noticed: a pause is planned, nothing started yet
        assert child.restart_at == now + child.pause and child.proc.poll() is not None and child.proc.returncode == 3
        pauses.append(child.pause)
        child.check(now + child.pause - 0.1)
        assert child.restart_at is not None  # still pausing
        now += child.pause
        child.check(now)  # started again
        assert child.restart_at is None
    assert pauses == [1, 2, 4, 8, 16, 30, 30, 30]
    deaths = [r for r in caplog.records if r.getMessage() == "a process died; starting it again"]
    assert [(r.child, r.exit_code, r.restart_in_seconds) for r in deaths] == [("dies", 3, p) for p in pauses]
    child.proc.wait(30)
    child.check(now + Child.STABLE_SECONDS)  # it stayed up a minute before dying: back to a short pause
    assert child.pause == 1


def test_api_children_share_the_port_and_above_one_a_metrics_folder_removed_at_the_end():
    import os
    from contextlib import ExitStack

    from service.dev.supervisor import api_children

    with ExitStack() as stack:
        (alone,) = api_children({"HTTP_PORT": "8080"}, 1, stack)
        assert alone.env == {"HTTP_PORT": "8080", "API_PROCESSES": "1"}  # one: no SO_REUSEPORT, plain metrics
        three = api_children({"HTTP_PORT": "8080"}, 3, stack)
        folder = three[0].env["PROMETHEUS_MULTIPROC_DIR"]
        assert os.path.isdir(folder) and not os.listdir(folder)
        assert [(c.env["API_PROCESSES"], c.env["PROMETHEUS_MULTIPROC_DIR"], c.argv[-3:]) for c in three] == [
            ("3", folder, ["api", "--processes", "1"])] * 3
    assert not os.path.exists(folder)
