"""Fixtures for the end-to-end layer: a fake OpenAI upstream in a thread, and the real
daemon (``twistd -n yugongd``) as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakeupstream import FakeUpstream  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: the twistd of the Python running the tests
TWISTD = shutil.which("twistd", path=str(Path(sys.executable).parent)) or "twistd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    """One fake upstream for a whole test module (modules that share one daemon)."""
    server = FakeUpstream().start()
    try:
        yield server
    finally:
        server.stop()


class Daemon:
    """A running ``twistd -n yugongd`` with its own config, log and working directory."""

    def __init__(self, workdir: Path, config: str | None, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "yugongd.yaml"
        self.log_path = workdir / "twistd.log"
        # hermetic: nothing of the caller's OpenAI settings leaks into the daemon
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        if config is not None:
            self.config_path.write_text(config.replace("{port}", str(self.port)))

    def command(self) -> list[str]:
        cmd = [TWISTD, "-n", "--pidfile=", "yugongd"]
        if self.config_path.exists():
            cmd += ["--config", str(self.config_path)]
        return cmd

    def start(self, wait: bool = True) -> Daemon:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"yugongd exited with {self.proc.returncode}:\n{self.output()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
        raise AssertionError(f"yugongd did not become ready:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def get(self, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, token=token)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if isinstance(body, dict):
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:
    started: list[Daemon] = []

    def make(config: str | None, env: dict[str, str] | None = None, start: bool = True) -> Daemon:
        workdir = tmp_path / f"d{len(started)}"
        workdir.mkdir()
        d = Daemon(workdir, config, env)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        d.stop()
