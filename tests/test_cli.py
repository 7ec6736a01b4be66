"""The admin CLI (the ``yugongd`` console script, as a subprocess) against a real daemon."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
from conftest import free_port

from yugongd import cli

ADMIN = "admin-token-for-cli-tests"
POOL_KEY = "sk-pool-aaaaaaaaaaaaaaaa1111"
POOL_KEY_2 = "sk-pool-bbbbbbbbbbbbbbbb2222"
NEW_POOL_KEY = "sk-pool-cccccccccccccccc3333"
ALICE = "sk-alice-0123456789abcdef"

#: the console script of the Python running the tests
SCRIPT = shutil.which("yugongd", path=str(Path(sys.executable).parent))

CONFIG = """
listen: "tcp:{{port}}:interface=127.0.0.1"
state: "sqlite:yugongd.db"
admin: {{token: "{admin}"}}
upstreams:
  - name: fake
    base_url: "{url}"
    timeouts: {{connect: 2, first_byte: 5, idle: 5}}
    keys:
      - {{id: fake-a, key: "{k1}"}}
      - {{id: fake-b, key: "{k2}"}}
prices:
  gpt-4o-mini: {{input: 0.15, output: 0.60}}
accounts:
  - name: alice
    key: "{alice}"
"""


@pytest.fixture
def daemon(upstream, daemon_factory):
    return daemon_factory(
        CONFIG.format(url=upstream.url, admin=ADMIN, k1=POOL_KEY, k2=POOL_KEY_2, alice=ALICE)
    )


def run(daemon, *args: str, token: str | None = ADMIN, stdin: str | None = None, url=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("YUGONGD_")}
    env["YUGONGD_URL"] = url or daemon.url
    if token is not None:
        env["YUGONGD_ADMIN_TOKEN"] = token
    cmd = [SCRIPT] if SCRIPT else [sys.executable, "-m", "yugongd.cli"]
    p = subprocess.run(
        [*cmd, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
    )
    return p.returncode, p.stdout, p.stderr


def chat(daemon, key: str) -> int:
    status, _, _ = daemon.request(
        "POST",
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        token=key,
    )
    return status


def rows(stdout: str) -> dict[str, list[str]]:
    """A table by its first column."""
    return {line.split()[0]: line.split() for line in stdout.splitlines()[1:] if line.strip()}


def test_the_console_script_is_installed():
    assert SCRIPT is not None, "pip install -e . installs the yugongd console script"


def test_keys_commands(daemon, upstream):
    code, out, err = run(daemon, "keys", "list")
    assert code == 0, err
    assert out.splitlines()[0].split()[:3] == ["ID", "UPSTREAM", "STATE"]
    table = rows(out)
    assert set(table) == {"fake-a", "fake-b"}
    assert table["fake-a"][2] == "active"
    assert POOL_KEY not in out and "sk-…1111" in out

    # add: the key is read from stdin, never an argument
    code, out, err = run(
        daemon, "keys", "add", "--upstream", "fake", "--id", "fake-c", stdin=NEW_POOL_KEY + "\n"
    )
    assert code == 0, err
    assert out.strip() == "added key fake-c (sk-…3333) to fake"
    assert NEW_POOL_KEY not in out
    assert "fake-c" in rows(run(daemon, "keys", "list")[1])

    code, out, err = run(daemon, "keys", "disable", "fake-c")
    assert (code, out.strip()) == (0, "key fake-c: disabled")
    assert rows(run(daemon, "keys", "list")[1])["fake-c"][2] == "disabled"
    code, out, err = run(daemon, "keys", "enable", "fake-c")
    assert (code, out.strip()) == (0, "key fake-c: active")

    code, out, err = run(daemon, "keys", "remove", "fake-c")
    assert (code, out.strip()) == (0, "removed key fake-c")
    assert "fake-c" not in rows(run(daemon, "keys", "list")[1])

    # errors: unknown key, unknown upstream
    code, out, err = run(daemon, "keys", "disable", "nope")
    assert code == 1 and "No key with id 'nope'" in err and "404" in err
    code, out, err = run(daemon, "keys", "add", "--upstream", "other", stdin="sk-x-123456789012\n")
    assert code == 1 and "upstream" in err

    code, out, err = run(daemon, "keys", "list", "--json")
    assert code == 0 and '"fake-a"' in out


def test_wrong_token_unreachable_and_no_token(daemon):
    code, out, err = run(daemon, "keys", "list", token="wrong")
    assert code == 1
    assert err.strip() == (
        f"yugongd: yugongd at {daemon.url} refused the admin token (401): check --token or "
        "YUGONGD_ADMIN_TOKEN"
    )
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(daemon, "keys", "list", url=dead)
    assert code == 3
    assert err.startswith(f"yugongd: cannot reach yugongd at {dead}: ")
    code, out, err = run(daemon, "keys", "list", token=None)
    assert code == 2 and "no admin token" in err
    code, out, err = run(daemon, "keys", "frobnicate")
    assert code == 2


def test_admin_api_off_is_explained(upstream, daemon_factory):
    d = daemon_factory(
        CONFIG.format(
            url=upstream.url, admin=ADMIN, k1=POOL_KEY, k2=POOL_KEY_2, alice=ALICE
        ).replace(f'admin: {{token: "{ADMIN}"}}\n', "")
    )
    code, out, err = run(d, "keys", "list")
    assert code == 1 and "the admin API is off" in err


def _accounts_api(daemon) -> bool:
    status, _, _ = daemon.get("/admin/accounts", token=ADMIN)
    return status == 200


def test_accounts_commands(daemon, upstream):
    if not _accounts_api(daemon):
        pytest.skip("/admin/accounts answers 404: the accounts admin API is not built yet")
    code, out, err = run(
        daemon, "accounts", "create", "carol", "--models", "gpt-4o-mini", "--credit", "5"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("created account carol (id ")
    assert lines[1].startswith("key: sk-yg-")
    carol = lines[1][len("key: ") :]
    assert len(carol) == len("sk-yg-") + 48
    assert "shown once" in lines[2]
    assert chat(daemon, carol) == 200

    code, out, err = run(daemon, "accounts", "list")
    assert code == 0, err
    names = {line.split()[1] for line in out.splitlines()[1:]}
    assert names == {"alice", "carol"}
    assert carol not in out

    code, out, err = run(daemon, "accounts", "show", "carol")
    assert code == 0, err
    shown = dict(line.split(None, 1) for line in out.splitlines())
    assert shown["name"].strip() == "carol"
    assert shown["credit_usd"].strip() == "5.0000"
    assert "requests=1" in shown["usage"]
    assert "key" not in shown and carol not in out

    code, out, err = run(daemon, "accounts", "top-up", "carol", "10")
    assert code == 0, err
    assert out.startswith("account carol: credit 5.00 -> 15.00 USD")
    code, out, err = run(daemon, "accounts", "show", "carol", "--json")
    assert '"credit_usd": 15.0' in out

    code, out, err = run(daemon, "accounts", "rotate", "carol")
    assert code == 0, err
    new = out.splitlines()[1][len("key: ") :]
    assert new.startswith("sk-yg-") and new != carol
    assert chat(daemon, carol) == 401
    assert chat(daemon, new) == 200

    code, out, err = run(daemon, "accounts", "disable", "carol")
    assert (code, out.strip()) == (0, "account carol: disabled")
    assert chat(daemon, new) == 401
    code, out, err = run(daemon, "accounts", "enable", "carol")
    assert (code, out.strip()) == (0, "account carol: enabled")
    assert chat(daemon, new) == 200

    # a config account has unlimited credit here: top-up says what to do
    code, out, err = run(daemon, "accounts", "top-up", "alice", "1")
    assert code == 1 and "unlimited credit" in err
    code, out, err = run(daemon, "accounts", "show", "nobody")
    assert code == 1 and "no account with id or name 'nobody'" in err


def test_usage_report(daemon, upstream):
    if not _accounts_api(daemon):
        pytest.skip("/admin/accounts answers 404: the accounts admin API is not built yet")
    status, _, _ = daemon.get("/admin/usage", token=ADMIN)
    if status == 404:
        pytest.skip("/admin/usage answers 404: not built yet")
    for _ in range(3):
        assert chat(daemon, ALICE) == 200
    today = datetime.datetime.now(datetime.timezone.utc).date()
    since, until = today.isoformat(), (today + datetime.timedelta(days=1)).isoformat()
    deadline = time.monotonic() + 5
    while True:  # the ledger is written behind (at most a second)
        code, out, err = run(daemon, "usage", "--since", since, "--until", until)
        assert code == 0, err
        table = rows(out)
        if "alice" in table or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    header = out.splitlines()[0].split()
    assert header == [
        "ACCOUNT",
        "MODEL",
        "REQUESTS",
        "PROMPT_TOKENS",
        "COMPLETION_TOKENS",
        "COST_USD",
    ]
    alice = table["alice"]
    assert alice[1] == "gpt-4o-mini" and alice[2] == "3"
    assert table["TOTAL"][1] == "3"
    # another range: nothing but the total line
    code, out, err = run(daemon, "usage", "--since", "2001-01-01", "--until", "2001-01-02")
    assert code == 0, err
    assert rows(out)["TOTAL"][1:] == ["0", "0", "0", "0.0000"]
    code, out, err = run(daemon, "usage", "--account", "alice", "--json")
    assert code == 0 and '"gpt-4o-mini"' in out


# -- in process: formatting -----------------------------------------------------------------


def test_table_aligns_numbers_right():
    out = StringIO()
    cli.table([["a", 1, 0.5], ["bbbb", 100, None]], ["NAME", "N", "COST"], out)
    assert out.getvalue().splitlines() == [
        "NAME    N  COST",
        "a       1  0.5000",
        "bbbb  100  -",
    ]
