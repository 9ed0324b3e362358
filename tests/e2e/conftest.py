"""One `segmentation dev` stack for the end-to-end tests that only use it (each start costs seconds)."""
import pytest

from service.dev.supervisor import child_stack


@pytest.fixture(scope="package")
def dev():
    """`make run` as a user starts it, on free ports; its Settings."""
    with child_stack() as settings:
        yield settings
