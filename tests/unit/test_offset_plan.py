"""Where a partition's consumption starts, given the offset stored in PostgreSQL and the log's bounds."""
from consumers.worker import start_position


def test_inside_the_log_the_stored_offset_wins():
    assert start_position(stored=5, log_start=0, log_end=10) == (5, None)
    assert start_position(stored=10, log_start=0, log_end=10) == (10, None)  # caught up
    assert start_position(stored=3, log_start=3, log_end=3) == (3, None)


def test_beyond_the_logs_end_it_starts_again_at_the_logs_beginning():
    assert start_position(stored=1000, log_start=0, log_end=10) == (0, "beyond_log_end")
    assert start_position(stored=1000, log_start=4, log_end=10) == (4, "beyond_log_end")


def test_before_the_logs_start_the_deleted_commands_are_reported_lost():
    assert start_position(stored=2, log_start=7, log_end=10) == (7, "before_log_start")
