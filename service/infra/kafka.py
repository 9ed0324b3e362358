"""Kafka clients built from settings: security, producer, consumer, topics."""
from __future__ import annotations

import asyncio
import logging
import ssl
import struct

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, OffsetOutOfRangeError

from service.infra.settings import Settings

log = logging.getLogger("segmentation.kafka")


def client_options(settings: Settings) -> dict:
    """Bootstrap servers plus SASL (PLAIN, SCRAM-SHA-256/512) and TLS, as the settings say."""
    opts: dict = {"bootstrap_servers": settings.kafka_bootstrap_servers,
                  "security_protocol": settings.kafka_security_protocol}
    if uses_tls(settings):
        opts["ssl_context"] = ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism or "PLAIN"
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        opts["sasl_plain_password"] = settings.kafka_sasl_password
    return opts


def uses_tls(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SSL", "SASL_SSL")


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """Verifies the broker's certificate and host name against KAFKA_SSL_CAFILE (the system's CAs if unset);
    presents the client certificate when one is set (mutual TLS)."""
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    return context


async def tls_failure(settings: Settings) -> str | None:
    """Why TLS with the bootstrap servers fails, or None (no TLS, or nothing wrong with it). aiokafka only logs
    the reason and raises "Unable to bootstrap"; this handshake, made again, names it."""
    if not uses_tls(settings):
        return None
    context = ssl_context(settings)
    for server in settings.kafka_bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port), ssl=context, server_hostname=host.strip("[]")), 5)
        except ssl.SSLError as exc:
            hint = " (is the broker's CA in KAFKA_SSL_CAFILE?)" if isinstance(exc, ssl.SSLCertVerificationError) else ""
            return f"TLS with {host}:{port} failed: {exc.strerror or exc}{hint}"
        except (OSError, TimeoutError, ValueError):
            continue
        try:  # with TLS 1.3 a server that wants a client certificate refuses it after the handshake
            await asyncio.wait_for(reader.read(1), 0.5)
        except ssl.SSLError as exc:
            hint = (" (the broker wants a client certificate: KAFKA_SSL_CERTFILE, KAFKA_SSL_KEYFILE)"
                    if "CERTIFICATE_REQUIRED" in str(exc) else "")
            return f"TLS with {host}:{port} failed: {exc.strerror or exc}{hint}"
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
    return None


class _ExplainsTls:
    """Mixed into the aiokafka clients: a failed start says why TLS failed (`settings` set by the subclass)."""

    settings: Settings

    async def start(self) -> None:
        try:
            await super().start()  # type: ignore[misc]  # the aiokafka client it is mixed into
        except KafkaConnectionError as exc:
            reason = await tls_failure(self.settings)
            if reason is None:
                raise
            raise KafkaConnectionError(f"{exc.args[0] if exc.args else exc}: {reason}") from exc


class Producer(_ExplainsTls, AIOKafkaProducer):
    def __init__(self, settings: Settings, **options):
        super().__init__(**options)
        self.settings = settings


class Consumer(_ExplainsTls, AIOKafkaConsumer):
    def __init__(self, settings: Settings, *topics: str, **options):
        super().__init__(*topics, **options)
        self.settings = settings


class Admin(_ExplainsTls, AIOKafkaAdminClient):
    def __init__(self, settings: Settings):
        super().__init__(**client_options(settings))
        self.settings = settings


def producer_options(settings: Settings) -> dict:
    """Producer options: idempotence is a setting (Apache Kafka: on; the embedded broker refuses it)."""
    return client_options(settings) | {
        "enable_idempotence": settings.kafka_enable_idempotence,
        "acks": "all" if settings.kafka_enable_idempotence else _acks(settings.kafka_acks),
        "linger_ms": settings.kafka_linger_ms,
        "compression_type": settings.kafka_compression_type,
        "max_batch_size": 1024 * 1024,
        "max_request_size": settings.kafka_max_request_size,
    }


def producer(settings: Settings, **overrides) -> AIOKafkaProducer:
    """A producer from settings; `overrides` win (tests and benchmarks)."""
    return Producer(settings, **(producer_options(settings) | overrides))


def _acks(value: str):
    return value if value == "all" else int(value)


def consumer(settings: Settings, *topics: str, group: str | None, **overrides) -> AIOKafkaConsumer:
    """A consumer with manual commits; `group=None` reads without a group (CLI watch, tests)."""
    opts = client_options(settings) | {
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        "rebalance_timeout_ms": settings.kafka_rebalance_timeout_ms,
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
    }
    return Consumer(settings, *topics, **(opts | overrides))


async def assign_all(consumer: AIOKafkaConsumer, *topics: str, timeout: float = 30.0) -> list[TopicPartition]:
    """Assign every partition of `topics` to a group-less consumer (waits for their metadata)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tps: list[TopicPartition] = []
    for topic in topics:
        while not (parts := consumer.partitions_for_topic(topic)):
            if loop.time() > deadline:
                raise RuntimeError(f"no metadata for topic {topic}")
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        tps += [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    return tps


async def seek_to_end_now(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
    """Seek to the end of `tps` as it is now, resolved at once: what is published afterwards is read."""
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)


async def holding(settings: Settings, offsets: dict[TopicPartition, int], timeout: float = 5.0) -> set[TopicPartition]:
    """The partitions whose log still holds the record at the offset given for it, asked with a fetch. The end a
    broker lists can be short of the log: the embedded one lists the last producer batch's base offset + 1. A held
    record answers at once; `timeout` is generous because no answer counts as "not held" (a reset to the log's
    beginning): only a log that really lost the record (recreated, truncated) waits it out."""
    fetcher = consumer(settings, group=None, auto_offset_reset="none")
    await fetcher.start()
    try:
        fetcher.assign(list(offsets))
        for tp, offset in offsets.items():
            fetcher.seek(tp, offset)
        held: set[TopicPartition] = set()
        deadline = asyncio.get_running_loop().time() + timeout
        while (waiting := [tp for tp in offsets if tp not in held]) \
                and (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                batch = await fetcher.getmany(*waiting, timeout_ms=int(left * 1000), max_records=len(waiting))
            except OffsetOutOfRangeError as exc:  # Kafka's answer for an offset the log no longer has
                fetcher.pause(*exc.args[0])
                continue
            held |= {tp for tp, records in batch.items() if any(r.offset >= offsets[tp] for r in records)}
        return held
    finally:
        await fetcher.stop()


def topic_plan(settings: Settings) -> dict[str, int]:
    """Every topic of the service and its partition count."""
    return {
        settings.commands_topic: settings.commands_partitions,
        settings.dlq_topic: 1,
        settings.results_topic: settings.events_partitions,
        settings.membership_topic: settings.events_partitions,
        settings.segment_topic: settings.events_partitions,
    }


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Topic settings given at creation: the commands topic and the DLQ (which holds their original bytes)
    accept a message as large as the producers may send (a bulk UpdateSegmentMembers of 100 000 ids)."""
    limit = {"max.message.bytes": str(settings.kafka_max_request_size)}
    return {settings.commands_topic: limit, settings.dlq_topic: limit}


TOPIC_ALREADY_EXISTS = 36


async def create_topics(settings: Settings) -> list[str]:
    """Create the topics that do not exist yet; returns the names created. Raises if Kafka refuses one."""
    admin = Admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        plan = topic_plan(settings)
        configs = topic_configs(settings)
        wanted = [NewTopic(name, partitions, settings.replication_factor, topic_configs=configs.get(name, {}))
                  for name, partitions in plan.items() if name not in existing]
        created = []
        if wanted:
            # The answer carries an error code per topic; nothing is raised for them.
            response = await admin.create_topics(wanted)
            refused = []
            for name, code, *message in response.topic_errors:
                if code == 0:
                    created.append(name)
                    log.info("topic created", extra={"topic": name, "partitions": plan[name]})
                elif code != TOPIC_ALREADY_EXISTS:
                    refused.append(f"{name}: error {code} {message[0] if message else ''}".strip())
            if refused:
                raise RuntimeError(f"Kafka refused to create topics: {'; '.join(refused)}")
        return created
    finally:
        await admin.close()


_M, _MASK = 0x5BD1E995, 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """The Java client's murmur2 of a key (`org.apache.kafka.common.utils.Utils.murmur2`), as aiokafka's pure-Python
    one computes it, twice as fast (the words unpacked at once, fewer masks): the relay computes one per message.
    A property test holds it equal to aiokafka's."""
    length = len(data)
    h = 0x9747B28C ^ length
    for k in struct.unpack_from(f"<{length >> 2}I", data):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    if tail := length & 3:
        base = length & ~3
        if tail >= 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)
