"""docker-compose.yml: valid Compose, and every container of our image runs a real CLI subcommand."""
import json
import shlex
from pathlib import Path

import pytest
import typer
import yaml
from jsonschema import Draft7Validator

from service.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"  # the Compose Specification's JSON schema
OUR_IMAGE = "segmentation:latest"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def ours(compose) -> dict:
    services = {name: s for name, s in compose["services"].items() if s.get("image") == OUR_IMAGE}
    assert set(services) == {"init", "api", "worker", "relay", "ttl"}
    return services


def _invocations(service: dict) -> list[list[str]]:
    """The `segmentation ...` command lines a container runs (the image's ENTRYPOINT is `segmentation`)."""
    entrypoint, command = service.get("entrypoint", ["segmentation"]), service.get("command", ["api"])
    if entrypoint == ["sh", "-c"]:
        return [shlex.split(part) for part in " ".join(command).split("&&")]
    return [entrypoint + command]


def test_compose_file_follows_the_compose_specification(compose):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = [f"{e.json_path}: {e.message}" for e in Draft7Validator(schema).iter_errors(compose)]
    assert errors == []


def test_the_schema_check_catches_mistakes(compose):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    broken = {**compose, "services": {**compose["services"], "api": {**compose["services"]["api"], "portz": []}}}
    assert not Draft7Validator(schema).is_valid(broken)


def test_every_container_of_our_image_runs_a_cli_subcommand(ours):
    subcommands = set(typer.main.get_command(app).commands)
    for name, service in ours.items():
        for argv in _invocations(service):
            assert argv[0] == "segmentation" and argv[1] in subcommands, (name, argv)
    assert {argv[1] for argv in _invocations(ours["init"])} == {"migrate", "topics"}
    for process in ("api", "worker", "relay", "ttl"):
        assert _invocations(ours[process]) == [["segmentation", process]]


def test_processes_wait_for_healthy_servers_and_a_finished_init(compose, ours):
    assert "healthcheck" in compose["services"]["kafka"] and "healthcheck" in compose["services"]["postgres"]
    assert ours["init"]["depends_on"] == {"kafka": {"condition": "service_healthy"},
                                          "postgres": {"condition": "service_healthy"}}
    for name in ("api", "worker", "relay", "ttl"):
        depends = ours[name]["depends_on"]
        assert depends["kafka"]["condition"] == depends["postgres"]["condition"] == "service_healthy", name
        assert depends["init"]["condition"] == "service_completed_successfully", name


def test_scaling_and_kafka_producer_settings(ours):
    assert ours["worker"]["deploy"]["replicas"] == 2
    assert ours["init"]["environment"]["COMMANDS_PARTITIONS"] == "12"
    assert ours["api"]["environment"]["HTTP_HOST"] == "0.0.0.0"
    assert "/readyz" in " ".join(ours["api"]["healthcheck"]["test"])
    for name, service in ours.items():
        env = service["environment"]
        assert env["KAFKA_ENABLE_IDEMPOTENCE"] == "true" and env["KAFKA_ACKS"] == "all", name
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert env["DATABASE_URL"] == "postgresql://segmentation:segmentation@postgres:5432/segmentation", name


def test_environment_names_are_settings_fields(ours):
    from service.infra.settings import Settings

    fields = {name.upper() for name in Settings.model_fields}
    for name, service in ours.items():
        assert set(service["environment"]) <= fields, (name, set(service["environment"]) - fields)


def test_background_processes_have_a_healthcheck_and_time_to_stop(compose):
    services = compose["services"]
    for name in ("worker", "relay", "ttl"):
        assert services[name]["healthcheck"]["test"][-1].endswith('9100/metrics", timeout=3)')
        assert services[name]["stop_grace_period"] == "15s"  # more than the 7 s the process gives its batch
