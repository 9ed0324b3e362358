"""Process plumbing: the garbage collector of long-running processes."""
import gc

from service.infra import runtime


def test_a_long_running_process_freezes_what_it_started_with_and_collects_young_objects_less_often():
    before = gc.get_threshold()
    try:
        runtime.tune_gc()
        assert gc.get_threshold() == runtime.GC_THRESHOLDS
        assert gc.get_threshold()[0] > before[0]
        assert gc.get_freeze_count() > 0  # start-up objects are out of the collector's view
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
