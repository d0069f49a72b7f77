"""`bulwark up`: run the processes of the Procfile, on an embedded Redis if needed.

A process that exits on its own is restarted with a back-off, and a crash loop
is reported (`workers.ops.manager`); the rest of the fleet keeps running.
Ctrl-C (or SIGTERM) reaches this supervisor only (every child runs in its own
session); it sends SIGTERM to each child's process group, SIGKILL after 5 s, and
the embedded Redis stops last, its folder removed.

The embedded Redis (Redis 6 or later) has ACL users per role (`workers.ops.acl`):
each process connects as its role's user (`REDIS_ROLE_OF`), with a password generated
for this run in a file of the state folder (mode 0600) named by
BULWARK_REDIS_PASSWORD_FILE; the user is in REDIS_URL, the password never is.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from workers.ops.acl import Acl, supported
from workers.ops.embedded import EmbeddedRedis, find_redis_server, redis_version
from workers.ops.manager import SupervisedManager
from workers.procfile import ProcfileError, read_procfile
from workers.resources import wait_for_redis
from workers.scaling.groups import parse_worker_command
from workers.secrets import hide_password
from workers.security.keys import dev_keys
from workers.settings import Settings


@dataclass(frozen=True, slots=True)
class Fleet:
    """What `bulwark up` will run, resolved before anything starts."""

    processes: dict[str, str]
    env: dict[str, str]
    flower_user: str
    flower_password: str
    flower_password_generated: bool
    #: Per process, the variables of its identity (development keys), if `up` made them.
    identities: dict[str, dict[str, str]] | None = None
    keys_folder: Path | None = None
    #: Per process, its Redis user's REDIS_URL and password file, with ACL users.
    redis_users: dict[str, dict[str, str]] | None = None

    def env_of(self, name: str) -> dict[str, str]:
        return {
            **self.env,
            **(self.identities or {}).get(name, {}),
            **(self.redis_users or {}).get(name, {}),
        }


#: Who each Procfile process signs as, with the development keys.
IDENTITY_OF = {"flower": "operator", "demo": "demo"}


def with_dev_keys(fleet: Fleet, settings: Settings) -> Fleet:
    """With security on and no trust store given: development keys in the keys folder
    (made once, kept across runs), an identity for each process, and an audit log."""
    if not settings.security.enabled or settings.security.trust_file:
        return fleet
    folder = settings.keys_folder.resolve()
    keys = dev_keys(folder)
    fleet.env.setdefault("BULWARK_AUDIT_DIR", str(folder.parent / "audit"))
    fleet.env.setdefault("BULWARK_ENCRYPT", "payments.*")  # the demo's charges travel sealed
    identities = {name: keys.env(IDENTITY_OF.get(name, "worker")) for name in fleet.processes}
    return replace(fleet, identities=identities, keys_folder=folder)


#: Whose Redis user each Procfile process connects as, with ACL users (else "worker").
#: The demo is a producer that also plays a flaky gateway: its user is the producer's
#: with the demo's keys (`bulwark:{demo:*}:*`) added.
REDIS_ROLE_OF = {"demo": "demo"}


def password_files(folder: Path, passwords: Mapping[str, str]) -> dict[str, Path]:
    """Each user's password in `folder/<user>.password` (folder 0700, files 0600)."""
    folder.mkdir(mode=0o700, exist_ok=True)
    files = {}
    for user, password in passwords.items():
        path = folder / f"{user}.password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(password + "\n")
        files[user] = path
    return files


def with_redis_users(fleet: Fleet, redis: EmbeddedRedis, files: Mapping[str, Path]) -> Fleet:
    """Each process connects as its role's ACL user: the user in REDIS_URL, its password
    from BULWARK_REDIS_PASSWORD_FILE (a password given to `up` is not passed on)."""
    for name in ("BULWARK_REDIS_PASSWORD", "BULWARK_REDIS_PASSWORD_FILE"):
        fleet.env.pop(name, None)
    users = {}
    for name in fleet.processes:
        role = REDIS_ROLE_OF.get(name, "worker")
        users[name] = {
            "REDIS_URL": redis.url_for(role, password=False),
            "BULWARK_REDIS_PASSWORD_FILE": str(files[role]),
        }
    return replace(fleet, redis_users=users)


def select(
    processes: Mapping[str, str], only: Iterable[str], without: Iterable[str]
) -> dict[str, str]:
    only, without = list(only), list(without)
    unknown = sorted((set(only) | set(without)) - set(processes))
    if unknown:
        raise ProcfileError(
            f"unknown process {', '.join(unknown)}; the Procfile has " + ", ".join(processes)
        )
    return {n: c for n, c in processes.items() if (not only or n in only) and n not in without}


def _worker_queues(processes: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """The queues (`-Q`) of each entry that runs a Celery worker consuming named queues
    (an entry without -Q is not one: beat names the problem in its log)."""
    found = {}
    for name, command in processes.items():
        try:
            parsed = parse_worker_command(command, 1)
        except ValueError:
            continue
        if parsed is not None:
            found[name] = parsed[0]
    return found


def served_queues(processes: Mapping[str, str]) -> tuple[str, ...]:
    """Every queue a worker entry consumes: a balanced task's target queues are not in
    the settings, and the ACL users must reach them too."""
    return tuple(dict.fromkeys(q for queues in _worker_queues(processes).values()
                               for q in queues))  # fmt: skip


def worker_groups(processes: Mapping[str, str]) -> set[str]:
    """The entries that run a Celery worker consuming named queues: the groups beat's
    fleet scaler sizes, and `up` scales (a worker of one process, like alerts, too)."""
    return set(_worker_queues(processes))


def proc(settings: Settings, procfile: Path, name: str) -> None:
    """Replace this process with one Procfile entry (what docker-compose runs)."""
    command = select(read_procfile(procfile), [name], [])[name]
    env = dict(os.environ)
    if "FLOWER_BASIC_AUTH" not in env:
        password = settings.security.flower_password
        if name == "flower" and password is None:
            raise ProcfileError(
                "proc flower: set BULWARK_FLOWER_PASSWORD (or FLOWER_BASIC_AUTH); "
                "or BULWARK_FLOWER_PASSWORD_FILE; Flower never runs without basic auth"
            )
        if password is not None:
            env["FLOWER_BASIC_AUTH"] = f"{settings.security.flower_user}:{password.reveal()}"
    os.execvpe("/bin/sh", ["/bin/sh", "-c", f"exec {command}"], env)


def plan(
    settings: Settings,
    procfile: Path,
    *,
    only: Iterable[str] = (),
    without: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Fleet:
    env = dict(os.environ if environ is None else environ)
    security = settings.security
    given = security.flower_password
    generated = given is None
    password = secrets.token_urlsafe(12) if given is None else given.reveal()
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["FLOWER_BASIC_AUTH"] = f"{security.flower_user}:{password}"
    env.setdefault("PYTHONPATH", str(procfile.resolve().parent))
    return Fleet(
        processes=select(read_procfile(procfile), only, without),
        env=env,
        flower_user=security.flower_user,
        flower_password=password,
        flower_password_generated=generated,
    )


def banner(
    fleet: Fleet,
    redis_url: str,
    embedded: bool,
    flower_port: int,
    *,
    acl: str = "",
    operator: str = "",
) -> str:
    """What `up` prints first. `acl`: a note on the embedded Redis's ACL users; `operator`:
    the variables a `bulwark` command needs to run as the operator there."""
    where = "embedded redis-server" if embedded else "REDIS_URL"
    lines = [
        "",
        "Bulwark fleet starting: " + ", ".join(fleet.processes),
        f"  Redis     {hide_password(redis_url)}  ({where})",
    ]
    if acl:
        lines.append(f"  ACL       {acl}")
    if "flower" in fleet.processes:
        shown = (
            fleet.flower_password
            if fleet.flower_password_generated
            else "(BULWARK_FLOWER_PASSWORD)"
        )
        url = f"http://127.0.0.1:{flower_port}/"
        lines.append(f"  Flower    {url}  user {fleet.flower_user}  password {shown}")
    if fleet.keys_folder is not None:
        lines.append(
            f"  Keys      {fleet.keys_folder}  (a producer: bulwark keys new-producer NAME "
            "--allow 'payments.*')"
        )
    operator = operator or f"REDIS_URL={hide_password(redis_url)}"
    lines += [
        f"  Status    {operator} bulwark status",
        f"  Dead      {operator} bulwark deadletter list",
        "  Stop      Ctrl-C",
        "",
    ]
    return "\n".join(lines)


def up(
    settings: Settings,
    procfile: Path,
    *,
    only: Iterable[str] = (),
    without: Iterable[str] = (),
) -> int:
    embedded: EmbeddedRedis | None = None
    acl_note = operator = ""
    state_dir = Path(tempfile.mkdtemp(prefix="bulwark-state-"))
    try:
        fleet = plan(settings, procfile, only=only, without=without)  # the Procfile first
        given = os.environ.get("REDIS_URL", "")
        if given:
            redis_url = supervisor_url = settings.redis_url  # BULWARK_REDIS_PASSWORD put in
            wait_for_redis(redis_url, master=settings.sentinel_master).close()
            fleet.env["REDIS_URL"] = given
        else:
            password = settings.redis_password
            binary = find_redis_server()
            acl = None
            if supported(redis_version(binary)):  # ACL users; a password given is the operator's
                queues = settings.all_queues + served_queues(fleet.processes)
                acl = Acl(tuple(dict.fromkeys(queues)), demo="demo" in fleet.processes)
            embedded = EmbeddedRedis(
                binary=binary, password=password.reveal() if password else None, acl=acl
            ).start()
            redis_url = supervisor_url = embedded.url
            # The processes get the password from BULWARK_REDIS_PASSWORD(_FILE), not the URL.
            fleet.env["REDIS_URL"] = f"redis://127.0.0.1:{embedded.port}/0"
            if embedded.acl is not None:
                files = password_files(state_dir / "redis", embedded.passwords)
                fleet = with_redis_users(fleet, embedded, files)
                supervisor_url = embedded.url_for("worker")  # its records of restarts
                version = ".".join(map(str, embedded.version))
                acl_note = (
                    f"redis-server {version}: users {', '.join(sorted(embedded.passwords))} "
                    f"(default off), passwords in {files['operator'].parent}"
                )
                operator = f"REDIS_URL={embedded.url_for('operator', password=False)}"
                if password is None:  # else the operator's is BULWARK_REDIS_PASSWORD's
                    operator += f" BULWARK_REDIS_PASSWORD_FILE={files['operator']}"
        fleet.env["BULWARK_STATE_DIR"] = str(state_dir)
        # Temporary files of the processes live in the state dir too: what a killed
        # process could not clean up is removed with it.
        (state_dir / "tmp").mkdir()
        fleet.env["TMPDIR"] = str(state_dir / "tmp")
        fleet.env.setdefault("BULWARK_METRICS_DIR", str(state_dir / "metrics"))
        fleet = with_dev_keys(fleet, settings)
        print(
            banner(fleet, redis_url, embedded is not None, settings.security.flower_port,
                   acl=acl_note, operator=operator),
            flush=True,
        )  # fmt: skip
        manager = SupervisedManager(
            redis_url=supervisor_url,
            sentinel_master=settings.sentinel_master,
            scale_every=settings.scaling.fleet_scale_interval,
        )
        cwd = str(procfile.resolve().parent)
        scaled = worker_groups(fleet.processes) if "beat" in fleet.processes else set()
        for name, cmd in fleet.processes.items():
            # exec: the process honcho signals is the program itself, not a shell
            manager.add_process(name, f"exec {cmd}", env=fleet.env_of(name), cwd=cwd)
            if name in scaled:
                manager.add_group(name, f"exec {cmd}", env=fleet.env_of(name), cwd=cwd)
        manager.loop()
        return int(manager.returncode or 0)
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
