"""TLS in front of the embedded broker, for tests: certificates made by deploy/tls/make-certs.sh (the script the
compose TLS example uses) and stunnel terminating TLS.

The broker (Tansu 0.6.0) serves no TLS itself (`--cert` and `--key` exclude each other, `--cert` alone answers a
handshake with nothing), so stunnel listens for TLS and forwards plain Kafka to it, and the broker advertises the
stunnel port: every connection of a client, the bootstrap and the ones metadata names, is TLS.

stunnel is Debian's `stunnel4` package, fetched once with `apt-get download` and unpacked with `dpkg -x` into a
cache (`~/.cache/segmentation/stunnel4`), with the libraries it needs that the machine lacks; nothing is installed.
If it cannot be fetched, `stunnel_command` raises: the TLS tests fail, they never skip.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.dev import embedded
from tests.support.helpers import ROOT

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segmentation" / "stunnel4"


def _library_dirs(root: Path) -> list[Path]:
    return [d for d in (root / "lib/x86_64-linux-gnu", root / "usr/lib/x86_64-linux-gnu",
                        root / "lib", root / "usr/lib") if d.is_dir()]


def stunnel_command(root: Path = CACHE) -> tuple[list[str], dict[str, str]]:
    """The stunnel binary (fetched into the cache when missing) and the environment that finds its libraries."""
    if not (root / "usr/bin/stunnel4").exists():
        _fetch(root)
    libs = ":".join(str(d) for d in _library_dirs(root))
    return [str(root / "usr/bin/stunnel4")], os.environ | {"LD_LIBRARY_PATH": libs}


def _run(*argv: str, cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")


def _download(packages: list[str], folder: Path) -> None:
    try:
        _run("apt-get", "download", *packages, cwd=folder)
    except RuntimeError:  # a fresh machine has no package lists yet
        _run("apt-get", "update", "-qq", cwd=folder)
        _run("apt-get", "download", *packages, cwd=folder)


def _installed(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.endswith(" installed")


def _fetch(root: Path) -> None:
    """Download stunnel4 and the shared libraries among its dependencies that are not installed; unpack them into
    `root` (built beside it and renamed into place, so parallel runs never see half of it)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stunnel4-", dir=root.parent))
    try:
        _download(["stunnel4"], work)
        [deb] = work.glob("stunnel4_*.deb")
        depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                                 check=True).stdout
        names = [re.split(r"[\s(:]", alt.strip())[0] for alt in depends.split(",")]
        missing = [n for n in names if n.startswith("lib") and not _installed(n)]
        if missing:
            _download(missing, work)
        for package in work.glob("*.deb"):
            _run("dpkg", "-x", str(package), str(work / "root"), cwd=work)
        try:
            (work / "root").rename(root)
        except OSError:  # another run put it there first
            if not (root / "usr/bin/stunnel4").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Certificates:
    """A CA, the broker's certificate (127.0.0.1 and localhost) and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(folder: Path) -> Certificates:
    """A new CA and certificates signed by it, for 127.0.0.1 and localhost."""
    done = subprocess.run(["sh", str(ROOT / "deploy/tls/make-certs.sh"), str(folder), "127.0.0.1", "localhost"],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"make-certs.sh failed ({done.returncode}): {done.stderr.strip()}")
    return Certificates(*(folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))


@contextmanager
def stunnel(accept_port: int, connect: str, certs: Certificates, log: Path) -> Iterator[subprocess.Popen]:
    """TLS on 127.0.0.1:`accept_port` (client certificates signed by the CA required), plain TCP to `connect`."""
    config = log.with_suffix(".conf")
    config.write_text(
        "foreground = yes\npid =\ndebug = notice\n"
        f"[kafka]\naccept = 127.0.0.1:{accept_port}\nconnect = {connect}\n"
        f"cert = {certs.server_cert}\nkey = {certs.server_key}\n"
        f"CAfile = {certs.ca}\nverifyChain = yes\nrequireCert = yes\n")
    argv, env = stunnel_command()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*argv, str(config)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        embedded.wait_port("127.0.0.1", accept_port, proc=proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def tls_broker(folder: Path) -> Iterator[tuple[str, Certificates]]:
    """A broker of its own reachable only through TLS; yields its TLS bootstrap address and the certificates."""
    certs = make_certificates(folder / "certs")
    tls_port = embedded.free_port()
    with embedded.broker(advertised_port=tls_port) as plain, stunnel(tls_port, plain, certs, folder / "stunnel.log"):
        yield f"127.0.0.1:{tls_port}", certs
