"""docker-compose.yml: valid Compose, and every container of our image runs a real CLI subcommand; the TLS override
connects every process to a TLS listener with certificates from deploy/tls/make-certs.sh."""
import asyncio
import json
import re
import shlex
import ssl
import subprocess
from pathlib import Path

import pytest
import typer
import yaml
from jsonschema import Draft7Validator

from service.cli.main import app
from service.infra import kafka
from service.infra.settings import Settings

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
    assert ours["api"]["environment"]["API_PROCESSES"] == "2"
    assert "/readyz" in " ".join(ours["api"]["healthcheck"]["test"])
    for name, service in ours.items():
        env = service["environment"]
        assert env["KAFKA_ENABLE_IDEMPOTENCE"] == "true" and env["KAFKA_ACKS"] == "all", name
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert env["DATABASE_URL"] == "postgresql://segmentation:segmentation@postgres:5432/segmentation", name


def test_environment_names_are_settings_fields(ours):
    fields = {name.upper() for name in Settings.model_fields}
    for name, service in ours.items():
        assert set(service["environment"]) <= fields, (name, set(service["environment"]) - fields)


def test_background_processes_have_a_healthcheck_and_time_to_stop(compose):
    services = compose["services"]
    for name in ("worker", "relay", "ttl"):
        assert services[name]["healthcheck"]["test"][-1].endswith('9100/metrics", timeout=3)')
        assert services[name]["stop_grace_period"] == "15s"  # more than the 7 s the process gives its batch


# --- monitoring: Prometheus and Grafana, provisioned from deploy/ ---------------------------------------------

MONITORING = {"prometheus": "prom/prometheus", "grafana": "grafana/grafana"}


def _bind_mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of each bind mount (`./host:/container[:ro]`)."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith("."):
            mounts[container] = (ROOT / host).resolve()
    return mounts


def test_monitoring_images_are_pinned_and_healthchecked_and_their_mounts_exist(compose):
    for name, image in MONITORING.items():
        service = compose["services"][name]
        repository, _, tag = service["image"].partition(":")
        assert repository == image and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), (name, service["image"])
        assert service["healthcheck"]["test"][0] == "CMD", name
        mounts = _bind_mounts(service)
        assert mounts, name
        for container, host in mounts.items():
            assert host.exists() and str(host).startswith(str(ROOT / "deploy")), (name, container, host)
        assert set(compose["volumes"]) >= {v.split(":")[0] for v in service["volumes"] if not v.startswith(".")}
    assert compose["services"]["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_prometheus_loads_its_rules_and_scrapes_every_process_on_its_port(compose, ours):
    mounts = _bind_mounts(compose["services"]["prometheus"])
    config_path = next(c for c in compose["services"]["prometheus"]["command"] if c.startswith("--config.file="))
    config = yaml.safe_load(mounts[config_path.split("=", 1)[1]].read_text())
    for rule_file in config["rule_files"]:  # relative to the config file, in the container as on the host
        assert f"/etc/prometheus/{rule_file}" in mounts, rule_file
    ports = {"api": ours["api"]["environment"]["HTTP_PORT"]}
    ports |= {name: ours[name]["environment"]["METRICS_PORT"] for name in ("worker", "relay", "ttl")}
    scraped = {job["job_name"]: job["dns_sd_configs"] for job in config["scrape_configs"]}
    assert set(scraped) == set(ports)
    for name, port in ports.items():
        assert scraped[name] == [{"names": [name], "type": "A", "port": int(port)}], name
        assert str(port) in (ours[name].get("expose", []) + [p.split(":")[-1] for p in ours[name].get("ports", [])])


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboards_folder(compose):
    mounts = _bind_mounts(compose["services"]["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]
    providers = yaml.safe_load((provisioning / "dashboards" / "segmentation.yml").read_text())["providers"]
    for provider in providers:
        folder = mounts[provider["options"]["path"]]
        assert list(folder.glob("*.json")), folder
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounts[str(Path(home).parent)] / Path(home).name).exists()


# ---- docker-compose.tls.yml: mutual TLS to Kafka, laid over docker-compose.yml ----------------------------------

@pytest.fixture(scope="module")
def tls_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())


def _listeners(value: str) -> dict[str, str]:
    """"NAME://host:port,..." as {NAME: "host:port"}."""
    return dict(item.split("://") for item in value.split(","))


def _container_path(volumes: list[str], path: str, host: Path) -> Path:
    """Where `path` inside a container is on `host`, through the service's bind mounts of ./certs."""
    for volume in volumes:
        source, target, *_ = volume.split(":")
        if path.startswith(target + "/"):
            assert source == "./certs"
            return host / path[len(target) + 1:]
    raise AssertionError(f"{path} is in no mounted folder")


def test_the_tls_override_follows_the_compose_specification(tls_compose, ours):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert [f"{e.json_path}: {e.message}" for e in Draft7Validator(schema).iter_errors(tls_compose)] == []
    assert set(tls_compose["services"]) == set(ours) | {"kafka"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """What the override's first line makes: deploy/tls/make-certs.sh certs kafka localhost."""
    folder = tmp_path_factory.mktemp("certs")
    subprocess.run(["sh", str(ROOT / "deploy/tls/make-certs.sh"), str(folder), "kafka", "localhost"], check=True,
                   capture_output=True, timeout=60)
    return folder


def test_the_tls_listener_is_the_one_every_process_uses(tls_compose, compose, ours, certs):
    base = compose["services"]["kafka"]["environment"]
    kafka = base | tls_compose["services"]["kafka"]["environment"]
    advertised = _listeners(kafka["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(pair.split(":") for pair in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(_listeners(kafka["KAFKA_LISTENERS"])) == set(protocols)  # every listener has a protocol
    assert "SSL" not in advertised and "SASL_SSL" not in advertised  # the image's script would want JKS stores
    for name in ours:
        env = ours[name]["environment"] | tls_compose["services"][name]["environment"]
        settings = Settings(**{k.lower(): v for k, v in env.items()})
        [listener] = [n for n, address in advertised.items() if address == settings.kafka_bootstrap_servers]
        assert protocols[listener] == settings.kafka_security_protocol == "SSL", name
        prefix = f"KAFKA_LISTENER_NAME_{listener}_SSL_"
        assert kafka[prefix + "CLIENT_AUTH"] == "required" and settings.kafka_ssl_certfile, name
        volumes = tls_compose["services"][name]["volumes"]
        for path in (settings.kafka_ssl_cafile, settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile):
            assert _container_path(volumes, path, certs).is_file(), (name, path)
    stores = tls_compose["services"]["kafka"]["volumes"]
    keystore = _container_path(stores, kafka[prefix + "KEYSTORE_LOCATION"], certs).read_text()
    assert kafka[prefix + "KEYSTORE_TYPE"] == kafka[prefix + "TRUSTSTORE_TYPE"] == "PEM"
    assert keystore.startswith("-----BEGIN PRIVATE KEY-----") and "BEGIN CERTIFICATE" in keystore  # PKCS#8, then the chain
    assert _container_path(stores, kafka[prefix + "TRUSTSTORE_LOCATION"], certs).read_text() == (certs / "ca.pem").read_text()


async def test_the_tls_overrides_certificates_pass_the_clients_checks(tls_compose, certs):
    """A TLS server with the broker's key store and trust store; the service's TLS context, from the override's
    settings, verifies it as `kafka` (the bootstrap host) and is verified in turn."""
    env = tls_compose["services"]["worker"]["environment"]
    settings = Settings(**{k.lower(): str(v).replace("/certs/", f"{certs}/") for k, v in env.items()})
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certs / "ca.pem")
    server.load_cert_chain(certs / "server-keystore.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    peers = []

    async def handle(reader, writer):
        peers.append(writer.get_extra_info("peercert"))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=kafka.ssl_context(settings),
                                                       server_hostname=settings.kafka_bootstrap_servers.split(":")[0])
        assert await reader.read() == b"ok"
        writer.close()
    finally:
        listener.close()
        await listener.wait_closed()
    assert dict(x[0] for x in peers[0]["subject"])["commonName"] == "segmentation"
