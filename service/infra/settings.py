"""One `Settings` object, read from environment variables (names are the field names, upper-cased)."""
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import topics


class Settings(BaseSettings):
    """Every knob of every process; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: str = "postgresql://postgres@127.0.0.1:5432/segmentation"
    kafka_bootstrap_servers: str = "127.0.0.1:9092"

    commands_topic: str = topics.COMMANDS
    dlq_topic: str = topics.DLQ
    results_topic: str = topics.RESULTS
    membership_topic: str = topics.MEMBERSHIP_CHANGED
    segment_topic: str = topics.SEGMENT_CHANGED
    commands_partitions: int = Field(default=12, ge=1)
    events_partitions: int = Field(default=12, ge=1)
    replication_factor: int = Field(default=1, ge=1)

    consumer_group: str = "segmentation-worker"
    worker_batch_max: int = Field(default=2000, ge=1)
    worker_poll_ms: int = Field(default=200, ge=1)
    kafka_session_timeout_ms: int = 10_000
    kafka_heartbeat_interval_ms: int = 1_000
    kafka_rebalance_timeout_ms: int = 10_000
    kafka_max_poll_interval_ms: int = 300_000
    kafka_fetch_max_wait_ms: int = Field(default=500, ge=0)  # Kafka's default; the dev stack's embedded broker: 20

    kafka_enable_idempotence: bool = False
    kafka_acks: str = "all"
    kafka_linger_ms: int = 5
    kafka_compression_type: str | None = None
    kafka_max_request_size: int = 4 * 1024 * 1024  # uncompressed; the commands and DLQ topics get it as max.message.bytes
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None

    relay_batch_max: int = Field(default=5000, ge=1)
    relay_poll_seconds: float = Field(default=1.0, gt=0)
    publish_timeout_seconds: float = Field(default=30.0, gt=0)

    ttl_batch_max: int = Field(default=5000, ge=1)
    ttl_max_sleep_seconds: float = Field(default=30.0, gt=0)

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    api_processes: int = Field(default=1, ge=1)  # API processes sharing http_port (SO_REUSEPORT) when above 1
    public_base_url: str | None = None
    read_cache_mb: int = Field(default=64, ge=0)  # users' answers each API process keeps in memory (0: none)
    api_tokens: str | None = None  # comma-separated bearer tokens or sha256:<hex> digests; unset: open
    metrics_port: int = 0
    log_level: str = "INFO"
    log_format: str = "json"
    db_pool_min: int = 1
    db_pool_max: int = 10
    # Every wait on PostgreSQL is bounded (the pools of the worker and the API). -1: keep the server's setting.
    db_command_timeout_seconds: float = Field(default=90.0, gt=0)  # client side: a half-open connection too
    db_statement_timeout_ms: int = Field(default=60_000, ge=-1)
    db_lock_timeout_ms: int = Field(default=10_000, ge=-1)
    db_idle_in_transaction_timeout_ms: int = Field(default=60_000, ge=-1)
    db_tcp_keepalives_idle_seconds: int = Field(default=10, ge=0)  # the server notices a vanished client
    db_tcp_keepalives_interval_seconds: int = Field(default=5, ge=0)  # (and frees its locks) within ~25 s
    db_tcp_keepalives_count: int = Field(default=3, ge=0)
    fan_out_slice: int = Field(default=20_000, ge=1)  # users per statement of a segment fan-out
    fan_out_pass_seconds: float = Field(default=0.25, ge=0)  # a rollout commits its slices this often (0: each)
    batch_retries_alone: int = Field(default=5, ge=1)  # failed retries (not connection loss), then record by record

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _sasl_credentials(self) -> Self:
        if self.kafka_security_protocol.startswith("SASL") and (
                self.kafka_sasl_username is None or self.kafka_sasl_password is None):
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs KAFKA_SASL_USERNAME and "
                             "KAFKA_SASL_PASSWORD")
        return self
