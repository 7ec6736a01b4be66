"""End to end: the real daemon (``twistd -n yugongd``) between the official ``openai`` SDK
and the fake upstream."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import signal
import sqlite3
import time

import openai
import pytest
from conftest import free_port
from fakeupstream import server_error, speech_bytes

POOL_KEY = "sk-pool-aaaaaaaaaaaaaaaa1111"
POOL_KEY_2 = "sk-pool-bbbbbbbbbbbbbbbb2222"
ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef00"

CONFIG = """
listen: "tcp:{port}:interface=127.0.0.1"
state: "sqlite:yugongd.db"
limits: {{max_body: 200000}}
upstreams:
  - name: fake
    base_url: "{url}"
    timeouts: {{connect: 2, first_byte: 5, idle: 5}}
    keys:
      - {{id: fake-a, key: "{k1}", organization: "org-one"}}
      - {{id: fake-b, key: "{k2}"}}
accounts:
  - name: alice
    key: "{alice}"
  - name: bob
    key: "{bob}"
    models: ["gpt-4o-mini", "text-embedding-3-*"]
"""


def config(upstream, **extra: str) -> str:
    text = CONFIG.format(
        port="{port}", url=upstream.url, k1=POOL_KEY, k2=POOL_KEY_2, alice=ALICE, bob=BOB
    )
    return text + "".join(f"{k}: {v}\n" for k, v in extra.items())


@pytest.fixture
def gateway(upstream, daemon_factory):
    return daemon_factory(config(upstream))


def sdk(daemon, key=ALICE, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=key, max_retries=0, **kw)


def test_chat_json_is_passed_through_with_the_pool_key(upstream, gateway):
    client = sdk(gateway)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.usage.prompt_tokens > 0
    seen = upstream.received[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.key in (POOL_KEY, POOL_KEY_2)
    assert ALICE not in json.dumps(seen.headers)
    assert raw.headers["x-request-id"].startswith("req_yg")
    # hop-by-hop headers of the upstream are not passed on
    assert "keep-alive" not in {k.lower() for k in raw.headers}
    assert seen.headers.get("x-request-id") == raw.headers["x-request-id"]


def test_organization_header_comes_from_the_key(upstream, gateway):
    client = sdk(gateway)
    for _ in range(4):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"OpenAI-Organization": "org-client"},
        )
    by_key = {r.key: r.headers.get("openai-organization") for r in upstream.received}
    assert by_key == {POOL_KEY: "org-one", POOL_KEY_2: None}


def test_client_request_id_is_kept(upstream, gateway):
    status, headers, _ = gateway.request(
        "POST",
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        token=ALICE,
        headers={"X-Request-Id": "my-id-123"},
    )
    assert status == 200
    assert headers["x-request-id"] == "my-id-123"
    assert upstream.received[-1].headers["x-request-id"] == "my-id-123"


def test_stream_is_relayed_and_the_added_usage_chunk_removed(upstream, gateway):
    client = sdk(gateway)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "stream me"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me"
    assert all(c.choices for c in chunks), "the usage chunk the client did not ask for is removed"
    forwarded = upstream.received[-1].json
    assert forwarded["stream_options"] == {"include_usage": True}


def test_stream_keeps_usage_when_the_client_asked(upstream, gateway):
    client = sdk(gateway)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream me"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens > 0


def test_stream_events_arrive_as_they_are_sent(upstream, gateway):
    """Each event reaches the client while the upstream is still sending: not buffered."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "slow"}], "stream": True}
    )
    conn.request(
        "POST",
        "/v1/chat/completions",
        body,
        {
            "Authorization": f"Bearer {ALICE}",
            "Content-Type": "application/json",
            "x-fake-events": "4",
            "x-fake-interval": "0.4",
        },
    )
    resp = conn.getresponse()
    assert resp.status == 200
    start = time.monotonic()
    first = resp.readline()
    elapsed_first = time.monotonic() - start
    rest = resp.read()
    total = time.monotonic() - start
    assert first.startswith(b"data: ")
    assert elapsed_first < 0.3 < total, (elapsed_first, total)
    assert rest.rstrip().endswith(b"data: [DONE]")


def test_endpoints_byte_identical(upstream, gateway):
    client = sdk(gateway)
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2
    audio = bytes(range(256)) * 400
    tr = client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", io.BytesIO(audio), "audio/wav")
    )
    assert tr.text == f"sha256:{hashlib.sha256(audio).hexdigest()} model:whisper-1"
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input="say this")
    assert speech.content == speech_bytes("say this")
    img = client.images.generate(model="dall-e-3", prompt="a cat")
    assert img.data[0].url
    mod = client.moderations.create(model="omni-moderation-latest", input="hello")
    assert mod.results
    comp = client.completions.create(model="gpt-4o-mini", prompt="legacy")
    assert comp.choices[0].text == "echo: legacy"
    resp = client.responses.create(model="gpt-4o-mini", input="new api")
    assert "new api" in resp.output_text
    paths = [r.path for r in upstream.received]
    assert "/v1/audio/transcriptions" in paths and "/v1/responses" in paths


def test_query_string_and_method_are_forwarded(upstream, gateway):
    status, _, _ = gateway.request("GET", "/v1/models?limit=2&after=x", token=ALICE)
    assert status == 200
    seen = upstream.received[-1]
    assert (seen.method, seen.path, seen.query) == ("GET", "/v1/models", "limit=2&after=x")


def test_models_list_is_filtered_to_the_allowlist(upstream, gateway):
    ids = {m.id for m in sdk(gateway, key=BOB).models.list()}
    assert ids == {"gpt-4o-mini", "text-embedding-3-small"}
    all_ids = {m.id for m in sdk(gateway).models.list()}
    assert len(all_ids) > len(ids)


def test_errors_use_the_openai_envelope(upstream, gateway):
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(gateway, key="sk-wrong-key-000000000").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as e:
        sdk(gateway, key=BOB).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.code == "model_not_allowed"
    status, headers, body = gateway.request(
        "POST",
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini", "messages": [',
        token=ALICE,
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_json"
    assert headers["x-request-id"]
    assert not [r for r in upstream.received if r.path == "/v1/chat/completions"]


def test_body_over_max_body_is_413(upstream, gateway):
    big = {"model": "gpt-4o-mini", "input": "x" * 300_000}
    status, _, body = gateway.request("POST", "/v1/embeddings", big, token=ALICE)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert not upstream.received
    # the daemon still serves after refusing
    assert gateway.get("/healthz")[0] == 200


def test_client_disconnect_mid_stream_aborts_the_upstream(upstream, gateway):
    sock = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "long"}], "stream": True}
    )
    sock.request(
        "POST",
        "/v1/chat/completions",
        body,
        {
            "Authorization": f"Bearer {ALICE}",
            "Content-Type": "application/json",
            "X-Request-Id": "leaving-early",
            "x-fake-events": "200",
            "x-fake-interval": "0.05",
        },
    )
    resp = sock.getresponse()
    assert resp.readline().startswith(b"data: ")
    sock.sock.close()
    sock.close()
    assert upstream.wait_for(lambda u: "leaving-early" in u.disconnects, timeout=5)


def test_failover_from_a_dead_key(upstream, daemon_factory):
    dead_port = free_port()
    cfg = config(upstream).replace(
        "upstreams:\n",
        "upstreams:\n"
        "  - name: dead\n"
        f'    base_url: "http://127.0.0.1:{dead_port}/v1"\n'
        "    keys: [{id: dead-1, key: sk-dead-000000000000000}]\n",
    )
    d = daemon_factory(cfg.replace("failover: ", ""))
    client = sdk(d)
    for _ in range(6):
        r = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
        assert r.choices[0].message.content == "echo: x"
    status, _, body = d.get("/healthz")
    assert json.loads(body)["keys"]["active"] >= 2


def test_failover_on_5xx_before_the_first_byte(upstream, gateway):
    upstream.script(POOL_KEY, server_error(503))
    client = sdk(gateway)
    for _ in range(2):
        r = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
        assert r.choices[0].message.content == "echo: x"
    # the key that answered 503 was followed at once by the other key
    keys = [x.key for x in upstream.received]
    assert len(keys) == 3
    failed_at = keys.index(POOL_KEY)
    assert keys[failed_at + 1] == POOL_KEY_2


def test_all_keys_failing_gives_the_upstream_error(upstream, gateway):
    upstream.set_default(POOL_KEY, server_error(500))
    upstream.set_default(POOL_KEY_2, server_error(500))
    with pytest.raises(openai.InternalServerError):
        sdk(gateway).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )


def test_other_4xx_is_passed_through_untouched(upstream, gateway):
    status, _, body = gateway.request(
        "POST", "/v1/no/such/endpoint", {"model": "gpt-4o-mini"}, token=ALICE
    )
    assert status == 404
    assert json.loads(body)["error"]["code"] == "unknown_url"
    assert len(upstream.received) == 1


def test_sigterm_flushes_the_ledger(upstream, gateway):
    client = sdk(gateway)
    for _ in range(3):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    # twistd exits through the signal it received, as a shell expects of a SIGTERMed daemon
    assert gateway.stop() in (0, -signal.SIGTERM)
    assert "Server Shut Down" in gateway.output()
    db = sqlite3.connect(gateway.workdir / "yugongd.db")
    rows = db.execute(
        "SELECT status, prompt_tokens, completion_tokens, cost_usd FROM ledger"
    ).fetchall()
    assert len(rows) == 3
    assert all(r[0] == 200 and r[1] > 0 and r[2] > 0 and r[3] > 0 for r in rows)


def test_config_error_exits_before_listening(daemon_factory):
    d = daemon_factory("listen: 'tcp:{port}'\nupstreams: []\nbogus: 1\n", start=False)
    d.start(wait=False)
    assert d.proc.wait(20) != 0
    out = d.output()
    assert "yugongd.yaml" in out and "bogus" in out
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", d.port, timeout=1).request("GET", "/healthz")


def test_embedded_defaults_single_user_mode(upstream, daemon_factory, tmp_path):
    d = daemon_factory(
        None,
        env={"OPENAI_API_KEY": f"{POOL_KEY}, {POOL_KEY_2}", "OPENAI_BASE_URL": upstream.url},
        start=False,
    )
    # the embedded defaults listen on 8080; move it for the test with a wrapper config-free run
    d.port = 8080
    d.url = "http://127.0.0.1:8080"
    try:
        probe = http.client.HTTPConnection("127.0.0.1", 8080, timeout=0.5)
        probe.request("GET", "/")
        pytest.skip("port 8080 is taken on this machine")
    except OSError:
        pass
    d.start()
    r = sdk(d, key="anything").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
    )
    assert r.choices[0].message.content == "echo: x"
    out = d.output()
    assert "single-user mode" in out
    assert POOL_KEY not in out and POOL_KEY_2 not in out
    d.stop()
    assert (d.workdir / "yugongd.db").exists()


def test_drop_in_plugin_is_loaded(upstream, daemon_factory):
    from conftest import ROOT

    cfg = config(upstream) + f'plugins: {{dirs: ["{ROOT / "plugins"}"]}}\n'
    d = daemon_factory(cfg, env={"YUGONGD_MAX_TOKENS_CAP": "100"})
    with pytest.raises(openai.BadRequestError) as e:
        sdk(d).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=500
        )
    assert e.value.code == "max_tokens_too_large"
    ok = sdk(d).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=50
    )
    assert ok.choices


def test_pool_keys_never_in_the_log(upstream, gateway):
    upstream.set_default(POOL_KEY, server_error(500))
    client = sdk(gateway)
    for _ in range(3):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    gateway.signal(signal.SIGTERM)
    gateway.proc.wait(20)
    out = gateway.output()
    assert "fake-a" in out  # the failing key is named by its id
    for secret in (POOL_KEY, POOL_KEY_2, ALICE, BOB):
        assert secret not in out


def test_a_slow_client_slows_the_upstream_read(upstream, gateway):
    """Backpressure: while the client reads nothing, the gateway stops reading the
    upstream instead of buffering the whole response in memory."""
    total = 200 * 1024 * 1024
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.request(
        "POST",
        "/v1/audio/speech",
        json.dumps({"model": "tts-1", "input": "x", "voice": "alloy"}),
        {
            "Authorization": f"Bearer {ALICE}",
            "Content-Type": "application/json",
            "X-Request-Id": "slow-reader",
            "x-fake-bytes": str(total),
        },
    )
    resp = conn.getresponse()
    assert resp.status == 200
    time.sleep(1.5)
    stalled = upstream.sent.get("slow-reader", 0)
    # kernel socket buffers on both hops hold a few MB at most; without backpressure the
    # gateway would have read all 200 MB from the loopback upstream by now
    assert 0 < stalled < 40 * 1024 * 1024, stalled
    received = 0
    while chunk := resp.read(1 << 20):
        received += len(chunk)
    assert received == total
    assert upstream.sent["slow-reader"] == total
