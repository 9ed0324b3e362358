"""The relay's per-message shortcuts give what the libraries they replace give."""
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from producers import leader
from service.infra import kafka, metrics


@given(st.binary(max_size=200))
def test_murmur2_is_the_java_clients(key):
    assert kafka.murmur2(key) == aiokafka_murmur2(key)


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=64))
def test_a_keyed_record_lands_where_the_default_partitioner_puts_it(key, count):
    partitions = list(range(count))
    assert leader.partition_of(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


@given(st.lists(st.tuples(st.floats(min_value=0, max_value=20, allow_nan=False), st.integers(1, 50)), max_size=20))
@example([(0.1, 3), (10.0, 2), (11.0, 1), (0.0, 1)])  # on a bound, past the last one
def test_observe_many_records_what_as_many_observes_record(observations):
    registry = CollectorRegistry()
    buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    one_by_one = Histogram("one_by_one_seconds", "", buckets=buckets, registry=registry)
    at_once = Histogram("at_once_seconds", "", buckets=buckets, registry=registry)
    for value, count in observations:
        for _ in range(count):
            one_by_one.observe(value)
        metrics.observe_many(at_once, value, count)

    def samples(name):
        return [(s.name.removeprefix(name), s.labels, round(s.value, 6)) for m in registry.collect()
                if m.name == name for s in m.samples if not s.name.endswith("_created")]

    assert samples("one_by_one_seconds") == samples("at_once_seconds")
