"""A real Flower on the Bulwark app (`python -m workers.ops.flower`), signing as the operator."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests import kit
from tests.kit import ROOT, child_env, free_port
from workers.security.keys import dev_keys


@dataclass
class Flower:
    url: str
    auth: tuple[str, str]
    log: Path
    process: subprocess.Popen[bytes]
    #: Every response read, by path: what is checked for canaries.
    responses: dict[str, str] = field(default_factory=dict)

    def get(self, path: str) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path)
        token = base64.b64encode(":".join(self.auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace")
        except OSError:
            return 0, ""
        self.responses[path] = text
        return status, text

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_flower(redis_url: str, env: dict[str, str], tmp_path: Path) -> Flower:
    """`python -m workers.ops.flower` signing as the operator, as `bulwark up` runs it."""
    port, auth = free_port(), ("ops", uuid.uuid4().hex)
    operator = dev_keys(Path(kit.SECURITY_ENV["BULWARK_TRUST_FILE"]).parent).env("operator")
    full = child_env(redis_url, {
        **operator, **env, "FLOWER_BASIC_AUTH": ":".join(auth), "TMPDIR": str(tmp_path),
    })  # fmt: skip
    log = tmp_path / "flower.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.ops.flower", "--address=127.0.0.1", f"--port={port}",
         "--persistent=False"],
        env=full, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    return Flower(f"http://127.0.0.1:{port}", auth, log, process)
