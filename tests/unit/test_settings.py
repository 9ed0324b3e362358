"""Settings: Kafka security options, and the README's settings table stays complete."""
import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.infra.kafka import client_options, producer_options, ssl_context
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
    sasl = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u", kafka_sasl_password="p")
    assert client_options(sasl)["sasl_mechanism"] == "PLAIN"
    on = producer_options(Settings(kafka_enable_idempotence=True, kafka_acks="1"))
    assert on["enable_idempotence"] is True and on["acks"] == "all"
    off = producer_options(Settings(kafka_acks="1"))
    assert off["enable_idempotence"] is False and off["acks"] == 1


def test_tls_verifies_the_broker_and_its_host_name():
    context = ssl_context(Settings(kafka_security_protocol="SSL"))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is True


def test_security_settings_are_checked_when_read():
    """A wrong name or missing credentials stop the process at start with the setting named (aiokafka alone fails
    later: SCRAM without a user name is an AttributeError at the first connection)."""
    credentials = dict(kafka_sasl_username="u", kafka_sasl_password="p")
    for wrong in (dict(kafka_security_protocol="TLS"),
                  dict(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA512", **credentials)):
        with pytest.raises(ValidationError, match="kafka_s"):
            Settings(**wrong)
    with pytest.raises(ValidationError, match="KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"):
        Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="u")
    lower = Settings(kafka_security_protocol="sasl_ssl", kafka_sasl_mechanism="scram-sha-256", **credentials)
    assert (lower.kafka_security_protocol, lower.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")
