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


def test_the_processes_on_the_embedded_broker_fetch_with_a_short_wait_unless_told_otherwise():
    """The embedded broker answers a waiting fetch only when its wait is over, not when a record arrives (a
    command waited up to ~115 ms per hop with Kafka's 500 ms): the dev stack's processes wait 20 ms. On an
    external broker, and where the user set it, their setting stands."""
    from service.dev.supervisor import child_env

    embedded = child_env({"PATH": "/bin"}, "postgresql://db", "127.0.0.1:9092", external_kafka=False)
    assert embedded == {"PATH": "/bin", "DATABASE_URL": "postgresql://db", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
                        "KAFKA_FETCH_MAX_WAIT_MS": "20"}
    assert "KAFKA_FETCH_MAX_WAIT_MS" not in child_env({}, "postgresql://db", "kafka:9092", external_kafka=True)
    told = child_env({"KAFKA_FETCH_MAX_WAIT_MS": "300"}, "postgresql://db", "127.0.0.1:9092", external_kafka=False)
    assert told["KAFKA_FETCH_MAX_WAIT_MS"] == "300"


async def test_consumers_take_their_fetch_wait_from_the_settings():
    from service.infra import kafka
    from service.infra.settings import Settings

    default, short = kafka.consumer(Settings(), group=None), kafka.consumer(Settings(kafka_fetch_max_wait_ms=20), group="g")
    try:
        assert default._fetch_max_wait_ms == 500  # Kafka's own default
        assert short._fetch_max_wait_ms == 20
    finally:
        await default.stop()
        await short.stop()
