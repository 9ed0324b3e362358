"""The fault proxy's modes against a real echo server, the Kafka path through it, and a PostgreSQL crash."""
import asyncio
import time

import asyncpg
import pytest

from service.dev import embedded
from tests.support.faults import FaultProxy, crash_postgres


@pytest.fixture
async def echo():
    async def serve(reader, writer):
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    proxy = await FaultProxy(server.sockets[0].getsockname()[:2], ("127.0.0.1", embedded.free_port())).start()
    yield proxy
    await proxy.stop()
    server.close()
    await server.wait_closed()


async def ping(proxy: FaultProxy, timeout: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection(*proxy.listen)
    try:
        writer.write(b"ping")
        await writer.drain()
        return await asyncio.wait_for(reader.read(4), timeout)
    finally:
        writer.close()


async def test_pass_refuse_reset_blackhole_and_delay(echo):
    opened = []

    async def connect():
        reader, writer = await asyncio.open_connection(*echo.listen)
        opened.append(writer)
        return reader, writer

    try:
        assert await ping(echo) == b"ping"
        reader, _ = await connect()  # an open connection, to see each cut
        await echo.set_mode("refuse")
        assert await reader.read(4) == b""  # cut
        with pytest.raises(ConnectionRefusedError):
            await ping(echo)
        await echo.set_mode("pass")
        assert await ping(echo) == b"ping"
        reader, _ = await connect()
        await echo.set_mode("reset")
        with pytest.raises(ConnectionResetError):
            await reader.read(4)
        with pytest.raises(ConnectionResetError):
            await ping(echo)
        await echo.set_mode("blackhole")
        reader, writer = await connect()  # connects: the socket is open
        writer.write(b"ping")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(4), 1.0)
        await echo.set_mode("pass")
        assert await asyncio.wait_for(reader.read(4), 5) == b"ping"  # held, not lost: TCP would retransmit it
        await echo.set_mode("delay", delay=0.5)
        started = time.monotonic()
        assert await ping(echo) == b"ping"
        assert time.monotonic() - started >= 1.0  # each way
    finally:
        for writer in opened:
            writer.close()


async def test_kafka_through_the_proxy_stops_and_goes_on(tmp_path):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    proxy_port = embedded.free_port()
    with embedded.broker(advertised_port=proxy_port) as direct:
        host, port = direct.split(":")
        proxy = await FaultProxy((host, int(port)), ("127.0.0.1", proxy_port)).start()
        producer = AIOKafkaProducer(bootstrap_servers=proxy.address, request_timeout_ms=3000)
        await producer.start()
        try:
            await producer.send_and_wait("faults", b"1")
            await proxy.set_mode("refuse")
            with pytest.raises(Exception):  # noqa: B017 - any Kafka error: the broker is out of reach
                await asyncio.wait_for(producer.send_and_wait("faults", b"2"), 10)
            await proxy.set_mode("pass")
            await producer.send_and_wait("faults", b"3")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer("faults", bootstrap_servers=proxy.address, auto_offset_reset="earliest")
        await consumer.start()
        try:
            batch = await consumer.getmany(timeout_ms=5000)
            values = {m.value for ms in batch.values() for m in ms}
        finally:
            await consumer.stop()
        await proxy.stop()
    assert {b"1", b"3"} <= values


async def test_postgres_crash_and_start_on_the_same_data(tmp_path):
    with embedded.postgres(tmp_path, database="postgres") as url:
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (1)")
        crash_postgres(url)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, OSError)):
            await conn.fetchval("SELECT 1")
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT n FROM kept") == 1  # committed before the crash: kept
        await conn.close()
