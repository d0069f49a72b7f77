"""From a failing check to an alert at a sink: measured on a real fleet.

    .venv/bin/python bench/alert_latency.py [--trials 3]

Starts a private redis-server, `bulwark up --only worker_general --only
worker_alerts --only beat` with the default intervals (health checks every
30 s, alert evaluation every 10 s, group wait 5 s) and a signed webhook sink
on a local HTTP receiver. Each trial sets the payments service offline (the
degradation health check turns unhealthy), and times until the critical alert
reaches the receiver; then sets it back to full and waits for the resolved
notice. The specification's target: well under 60 s. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.ops.embedded import EmbeddedRedis  # noqa: E402

received: list[tuple[float, dict[str, Any]]] = []
arrived = threading.Condition()


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with arrived:
            received.append((time.time(), json.loads(body)))
            arrived.notify_all()
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def degradation_alert(status: str, since: float) -> float | None:
    """Arrival time of a `status` alert of the degradation check received after `since`."""
    for at, payload in received:
        for alert in payload.get("alerts", []):
            if at >= since and alert["status"] == status and "degradation" in json.dumps(alert):
                return at
    return None


def wait_for(status: str, since: float, deadline: float) -> float | None:
    end = time.monotonic() + deadline
    with arrived:
        while (found := degradation_alert(status, since)) is None:
            left = end - time.monotonic()
            if left <= 0:
                return None
            arrived.wait(left)
    return found


def bulwark(*args: str) -> None:
    from workers.ops.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        main(list(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    with EmbeddedRedis() as redis_server, tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "REDIS_URL": redis_server.url,
            "BULWARK_ALERT_WEBHOOK_URL": url,
            "BULWARK_ALERT_WEBHOOK_SECRET": "bench-only-secret",
            "BULWARK_HTTP_PORT": "0",
            "TMPDIR": tmp,
        }
        os.environ["REDIS_URL"] = redis_server.url
        only = ["--only", "worker_general", "--only", "worker_alerts", "--only", "beat"]
        log = Path(tmp, "fleet.log").open("w")  # noqa: SIM115 (lives as long as the fleet)
        fleet = subprocess.Popen(
            [sys.executable, "-m", "workers.ops.cli", "up", *only],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            print("waiting for the fleet's first health check and alert evaluation ...")
            with arrived:
                arrived.wait_for(lambda: bool(received), timeout=90)
            figures = []
            for trial in range(1, args.trials + 1):
                started = time.time()
                bulwark("degrade", "payments", "offline", "--reason", "bench")
                fired = wait_for("firing", started, 120)
                if fired is None:
                    print(f"trial {trial}: no alert within 120 s")
                    continue
                figures.append(fired - started)
                bulwark("degrade", "payments", "full", "--reason", "bench")
                resolved = wait_for("resolved", fired, 120)
                shown = f"{resolved - fired:.1f} s" if resolved else "none in 120 s"
                print(f"trial {trial}: failing check -> alert at sink {fired - started:5.1f} s;"
                      f"  recovered -> resolved notice {shown}")  # fmt: skip
            if figures:
                print(
                    f"failing check -> alert at sink: min {min(figures):.1f} s, "
                    f"max {max(figures):.1f} s over {len(figures)} trials (target: well under 60 s)"
                )
        finally:
            os.killpg(fleet.pid, signal.SIGINT)
            fleet.wait(30)
            log.close()
            server.shutdown()


if __name__ == "__main__":
    main()
