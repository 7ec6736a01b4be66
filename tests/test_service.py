"""Running yugongd as a service: the systemd unit (``systemd-analyze verify`` when it is
installed, and the directives the contract needs either way), and ``twistd yugongd`` in
daemon mode with ``--pidfile`` and ``--logfile``."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TWISTD, free_port
from prometheus_client.parser import text_string_to_metric_families

UNIT = ROOT / "etc" / "yugongd.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def test_unit_runs_twistd_in_the_foreground_as_an_unprivileged_user():
    service = unit()["Service"]
    assert service.get("Type", "simple") == "simple"
    assert service["User"] not in ("", "root", "0")
    start = service["ExecStart"].split()
    assert Path(start[0]).name == "twistd"
    assert "--nodaemon" in start or "-n" in start
    assert "--pidfile=" in start, "no pidfile under systemd (it tracks the main process)"
    assert start[start.index("yugongd") + 1 :][:1] == ["--config"]


def test_unit_has_a_state_directory_that_is_the_working_directory():
    service = unit()["Service"]
    state = service["StateDirectory"]
    assert service["WorkingDirectory"] == f"/var/lib/{state}"
    assert f"/var/lib/{state}" in service.get("ReadWritePaths", "")
    assert service.get("UMask") == "0077"


def test_unit_reloads_with_sighup():
    reload = unit()["Service"]["ExecReload"]
    assert "kill" in reload and "-HUP" in reload and "$MAINPID" in reload


def test_unit_stop_timeout_is_above_shutdown_grace():
    service = unit()["Service"]
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    timeout = seconds(service["TimeoutStopSec"])
    example = yaml.safe_load((ROOT / "etc" / "yugongd.yaml").read_text())
    from yugongd.config import Config

    default_grace = Config(source="-").shutdown_grace
    assert timeout > max(default_grace, example["shutdown_grace"]) + 5


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart exists: point it at this environment's twistd
    text = UNIT.read_text().replace("/usr/local/bin/twistd", str(Path(TWISTD).resolve()))
    path = tmp_path / "yugongd.service"
    path.write_text(text)
    p = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    # unknown directives are only warnings (exit 0): any line about the unit is a failure
    problems = [line for line in (p.stdout + p.stderr).splitlines() if "yugongd.service" in line]
    assert p.returncode == 0 and not problems, p.stdout + p.stderr


# -- daemon mode ------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_twistd_daemon_mode_with_pidfile_and_logfile(upstream, tmp_path):
    port = free_port()
    (tmp_path / "yugongd.yaml").write_text(
        f"""
listen: "tcp:{port}:interface=127.0.0.1"
state: "sqlite:yugongd.db"
admin: {{token: "adm"}}
upstreams:
  - name: fake
    base_url: "{upstream.url}"
    keys: [{{id: fake-a, key: "sk-pool-aaaaaaaaaaaaaaaa1111"}}]
access_log: {{format: json}}
"""
    )
    pidfile, logfile = tmp_path / "yugongd.pid", tmp_path / "yugongd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    p = subprocess.run(
        [
            TWISTD,
            f"--pidfile={pidfile}",
            f"--logfile={logfile}",
            "yugongd",
            "--config",
            str(tmp_path / "yugongd.yaml"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr  # the parent returns once daemonised
    pid = 0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if pidfile.exists() and pidfile.read_text().strip():
                pid = int(pidfile.read_text())
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                        break
                except OSError:
                    pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"daemon did not come up:\n{logfile.read_text()}")
        assert pid != os.getpid() and _alive(pid)

        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            ).encode(),
            headers={"Content-Type": "application/json", "X-Request-Id": "daemon-mode-1"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer adm"}
            ),
            timeout=10,
        ) as r:
            scraped = r.read().decode()
        counted = [
            (s.labels, s.value)
            for family in text_string_to_metric_families(scraped)
            for s in family.samples
            if s.name == "yugongd_requests_total"
        ]
        assert counted == [({"status": "200", "model": "gpt-4o-mini", "account": "anonymous"}, 1.0)]

        # the access line reaches twistd's --logfile
        deadline = time.monotonic() + 5
        while "daemon-mode-1" not in logfile.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        [line] = [x for x in logfile.read_text().splitlines() if "daemon-mode-1" in x]
        assert "[yugongd.access#info]" in line
        record = json.loads(line[line.index("{") :])
        assert record["request_id"] == "daemon-mode-1" and record["status"] == 200
        assert record["key"] == "fake-a" and "sk-pool" not in logfile.read_text()

        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
        pid = 0
        assert not pidfile.exists(), "twistd removes its pidfile on a clean stop"
        assert "Main loop terminated" in logfile.read_text()
        # the state landed in the directory twistd was started in
        assert (tmp_path / "yugongd.db").exists()
    finally:
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
