"""Prometheus metrics of every process (the API serves /metrics, the others a metrics port)."""
import bisect

from prometheus_client import Counter, Gauge, Histogram, start_http_server

COMMANDS = Counter("segmentation_commands_total", "Commands processed", ["type", "status"])
DEAD_LETTERS = Counter("segmentation_dead_letters_total", "Records sent to the dead-letter topic")
BATCH_SIZE = Histogram("segmentation_batch_size", "Records per consumed batch",
                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000))
BATCH_SECONDS = Histogram("segmentation_batch_seconds", "Time to apply and commit one batch",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
COMMAND_LATENCY = Histogram("segmentation_command_latency_seconds",
                            "From a command's Kafka timestamp until its batch is committed",
                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
CONSUMER_LAG = Gauge("segmentation_consumer_lag", "Records behind the partition's end", ["topic", "partition"])
OFFSET_RESETS = Counter("segmentation_offset_resets_total",
                        "Partitions whose stored offset the log no longer holds", ["reason"])
BATCH_RETRIES = Counter("segmentation_batch_retries_total", "Batches retried after a database or broker error")
OUTBOX_BACKLOG = Gauge("segmentation_outbox_backlog", "Outbox rows not published yet in the shards this relay leads")
OUTBOX_OLDEST = Gauge("segmentation_outbox_oldest_seconds",
                      "Age of the oldest outbox row not published yet in the shards this relay leads (0: none)")
OUTBOX_SHARDS = Gauge("segmentation_outbox_shards", "Shards the outbox is cut into (the relays lead them all)")
OUTBOX_PUBLISHED = Counter("segmentation_outbox_published_total", "Outbox rows published", ["kind"])
OUTBOX_DROPPED = Counter("segmentation_outbox_dropped_total", "Outbox rows skipped: refused as too large")
OUTBOX_REFUSED = Counter("segmentation_outbox_refused_total", "Batches a topic refused (their rows wait)", ["kind"])
PUBLISH_LATENCY = Histogram("segmentation_outbox_publish_latency_seconds", "From outbox insert to broker ack",
                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
TTL_EXPIRIES = Counter("segmentation_ttl_expiries_published_total", "ExpireMembership commands published")
TTL_STARTS = Counter("segmentation_ttl_starts_published_total", "StartMembership commands published")
TTL_LAG = Gauge("segmentation_ttl_lag_seconds",
                "How long the oldest item due (an expiry or a scheduled start) has been waiting for the worker (0: none)",
                ["kind"])
RELAY_ACTIVE = Gauge("segmentation_relay_active", "1 while this relay takes part (connected, sharing the shards)")
RELAY_SHARDS = Gauge("segmentation_relay_shards", "Outbox shards this relay leads")
TTL_ACTIVE = Gauge("segmentation_ttl_active", "1 while this TTL producer holds the lock")
HTTP_REQUESTS = Counter("segmentation_http_requests_total", "HTTP requests", ["route", "method", "status"])
HTTP_LATENCY = Histogram("segmentation_http_request_seconds", "HTTP request latency", ["route"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))


def observe_many(histogram: Histogram, value: float, count: int) -> None:
    """What `count` calls of `histogram.observe(value)` record (a finite value, an unlabelled histogram), at the cost of
    one (the relay's rows of one transaction share their age: a call per row was a tenth of its CPU). It reaches into
    prometheus_client's
    Histogram (its bounds, bucket and sum values); a unit test holds it equal to the loop of observe()."""
    histogram._sum.inc(value * count)
    histogram._buckets[bisect.bisect_left(histogram._upper_bounds, value)].inc(count)


def serve(port: int) -> None:
    """Expose /metrics on `port` (0: off)."""
    if port:
        start_http_server(port)
