"""`ecr-gateway serve` as a real child process on OS-chosen loopback ports, for tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class Served:
    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        config: Path | None = None,
        new_group: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.new_group = new_group  # serve leads a process group of its own
        self.env = {
            **os.environ,
            "ECR_GATEWAY_GATEWAY__DATA_DIR": str(data_dir),
            "ECR_GATEWAY_SMTP__PORT": "0",
            "ECR_GATEWAY_HTTP__PORT": "0",
            **(env or {}),
        }
        self.env.pop("ECR_GATEWAY_CONFIG", None)
        if config:
            self.env["ECR_GATEWAY_CONFIG"] = str(config)
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.smtp_port = 0
        self.http_port = 0

    def start(self, timeout: float = 30) -> Served:
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"],
            env=self.env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            start_new_session=self.new_group,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for line in self.lines if (m := re.search(r"SMTP on [\d.]+:(\d+)", line))]
            if found:
                self.smtp_port = int(found[0].group(1))
                http = re.search(r"HTTP on [\d.]+:(\d+)", found[0].string)
                self.http_port = int(http.group(1)) if http else 0
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError("serve did not start:\n" + "".join(self.lines[-20:]))

    def _read(self) -> None:
        assert self.proc and self.proc.stderr
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc
        self.proc.kill()
        self.proc.wait(30)
