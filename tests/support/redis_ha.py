"""Private Redis topologies on loopback for the HA tests: a primary with replicas and
three Sentinels, and a three-primary Redis Cluster. Every server is started here, on
127.0.0.1 and free ports, and stopped by its own pid."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from common.sockets import free_port
from tests.support.env import CI

SERVICE = "mymaster"
DATA_PASSWORD, SENTINEL_PASSWORD = "data-pw-7", "sentinel-pw-9"


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if CI:
            raise RuntimeError(
                f"CI=true but {name} is not installed: .ci/run installs it"
            )
        pytest.skip(f"{name} is not installed")
    return found


class _Server:
    def __init__(self, args: list[str], log: Path) -> None:
        self._log = log.open("ab")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=self._log)

    def kill(self) -> None:
        """kill -9 by pid."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


def _cluster_port() -> int:
    """A free port a cluster node can use: its bus listens 10,000 above it."""
    while True:
        port = free_port()
        if port <= 55535:
            return port


def ask(port: int, command: str, *args: object, password: str | None = None) -> object:
    """One command to the server on ``port``, on a connection closed afterwards."""
    client = redis.Redis(port=port, password=password, socket_timeout=5)
    try:
        return client.execute_command(command, *args)
    finally:
        client.close()


def _wait(check: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} within {timeout:.0f}s")


class SentinelSet:
    """A primary, ``replicas`` replicas and three Sentinels (quorum 2).

    The data nodes require ``password``; the Sentinels require ``sentinel_password``.
    A Sentinel declares the primary down after ``down_after_ms``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        replicas: int = 1,
        password: str = DATA_PASSWORD,
        sentinel_password: str = SENTINEL_PASSWORD,
        down_after_ms: int = 1000,
    ) -> None:
        self.binary = _binary("redis-server")
        self.directory = directory
        self.password = password
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.data_ports = [free_port() for _ in range(1 + replicas)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.servers: dict[int, _Server] = {}
        self.clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return (
            f"redis+sentinel://:{self.password}@{hosts}/{SERVICE}/0"
            f"?sentinel_password={self.sentinel_password}"
        )

    def _data(self, port: int, primary: int | None) -> None:
        args = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--requirepass", self.password,
            "--masterauth", self.password,
        ]  # fmt: skip
        if primary is not None:
            args += ["--replicaof", "127.0.0.1", str(primary)]
        self.servers[port] = _Server(args, self.directory / f"redis-{port}.log")

    def start(self) -> None:
        primary, *replicas = self.data_ports
        self._data(primary, None)
        _wait(lambda: self.node(primary).ping(), "the primary did not start")
        for port in replicas:
            self._data(port, primary)
        for port in replicas:
            _wait(
                lambda p=port: (
                    self.node(p).info("replication")["master_link_status"] == "up"
                ),
                "a replica did not sync",
            )
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"requirepass {self.sentinel_password}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel auth-pass {SERVICE} {self.password}\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 2\n"
            )
            self.servers[port] = _Server(
                [self.binary, str(conf), "--sentinel"],
                self.directory / f"sentinel-{port}.log",
            )
        for port in self.sentinel_ports:
            # every Sentinel knows the others and the replicas
            _wait(
                lambda p=port: (
                    int(self._masters(p)["num-other-sentinels"]) == 2
                    and int(self._masters(p)["num-slaves"]) == len(replicas)
                ),
                "the Sentinels did not find each other",
            )

    def _masters(self, port: int) -> dict[str, str]:
        client = redis.Redis(
            port=port, password=self.sentinel_password, decode_responses=True
        )
        try:
            found: dict[str, str] = client.sentinel_master(SERVICE)  # type: ignore[no-untyped-call]
            return found
        finally:
            client.close()

    def node(self, port: int) -> redis.Redis:
        """A client of one data node (closed by ``stop``)."""
        client = redis.Redis(
            port=port,
            password=self.password,
            socket_timeout=5,
            socket_connect_timeout=1,
        )
        self.clients.append(client)
        return client

    def primary_port(self) -> int:
        """The primary the Sentinels name now."""
        return int(self._masters(self.sentinel_ports[0])["port"])

    def kill_primary(self) -> int:
        port = self.primary_port()
        self.servers[port].kill()
        return port

    def wait_for_new_primary(self, old: int, timeout: float = 30) -> int:
        _wait(
            lambda: (
                self.primary_port() != old
                and self.node(self.primary_port()).info("replication")["role"]
                == "master"
            ),
            "no failover",
            timeout,
        )
        return self.primary_port()

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.servers.values():
            server.stop()


class ClusterSet:
    """A Redis Cluster of three primaries (no replicas), made with ``redis-cli``."""

    def __init__(self, directory: Path) -> None:
        self.binary = _binary("redis-server")
        self.cli = _binary("redis-cli")
        self.directory = directory
        self.ports = [_cluster_port() for _ in range(3)]
        self.servers: list[_Server] = []
        self.clients: list[redis.Redis] = []

    def node(self, port: int) -> redis.Redis:
        """A client of one node (closed by ``stop``)."""
        client = redis.Redis(port=port, socket_timeout=5)
        self.clients.append(client)
        return client

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> None:
        for port in self.ports:
            self.servers.append(
                _Server(
                    [
                        self.binary,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(self.directory),
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                    self.directory / f"cluster-{port}.log",
                )
            )
        for port in self.ports:
            _wait(lambda p=port: ask(p, "PING"), "a node did not start")
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for port in self.ports:
            _wait(
                lambda p=port: b"cluster_state:ok" in ask(p, "CLUSTER", "INFO"),  # type: ignore[operator]
                "the cluster is not ok",
            )

    def owner(self, key: str) -> int:
        """The port of the node that serves ``key``'s slot."""
        from redis.cluster import RedisCluster

        cluster = RedisCluster(host="127.0.0.1", port=self.ports[0])
        try:
            return int(cluster.get_node_from_key(key).port)
        finally:
            cluster.close()

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.servers:
            server.stop()
