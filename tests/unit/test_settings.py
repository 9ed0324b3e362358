"""Settings: Kafka security options, and the README's settings table stays complete."""
from pathlib import Path

from service.infra.kafka import client_options, producer_options
from service.infra.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented_in_the_readme():
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in README]
    assert missing == []


def test_sasl_scram_over_tls():
    opts = client_options(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                                   kafka_sasl_username="u", kafka_sasl_password="p"))
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("u", "p")
    assert opts["ssl_context"] is not None


def test_plain_by_default_and_idempotence_is_a_setting():
    assert "ssl_context" not in client_options(Settings())
    assert "sasl_mechanism" not in client_options(Settings())
    assert client_options(Settings(kafka_security_protocol="SASL_PLAINTEXT"))["sasl_mechanism"] == "PLAIN"
    on = producer_options(Settings(kafka_enable_idempotence=True, kafka_acks="1"))
    assert on["enable_idempotence"] is True and on["acks"] == "all"
    off = producer_options(Settings(kafka_acks="1"))
    assert off["enable_idempotence"] is False and off["acks"] == 1
