"""The admin API: JSON over the client listener, behind ``admin.token``.

Without a configured token every admin path answers 404, as if it did not exist; a
wrong token is 401. The token is compared in constant time.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.web import server

from yugongd.errors import error_body, write_json
from yugongd.pool import UpstreamKey
from yugongd.site import read_body

if TYPE_CHECKING:
    from yugongd.gateway import Gateway


class AdminError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def key_object(key: UpstreamKey) -> dict[str, Any]:
    """A key as the admin API shows it: never the key itself, only its hint."""
    return {
        "id": key.id,
        "upstream": key.upstream,
        "state": key.state,
        "cooldown_until": key.cooldown_until if key.state == "cooling" else None,
        "disabled_reason": key.disabled_reason,
        "inflight": key.inflight,
        "requests": key.requests,
        "failures": key.failures,
        "last_error": key.last_error,
        "key_hint": key.hint,
        "remaining_requests": key.remaining_requests,
        "remaining_tokens": key.remaining_tokens,
        "organization": key.organization,
        "weight": key.weight,
        "models": list(key.models),
        "source": key.source,
    }


def _json_body(request: server.Request) -> dict[str, Any]:
    raw = read_body(request)
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise AdminError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise AdminError(400, "invalid_json", "The request body must be a JSON object.")
    return doc


class AdminAPI:
    """Routes ``/admin/…`` (and ``/metrics``, which shares the token)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.routes: list[tuple[bytes, bytes, Callable[..., Any]]] = [
            (b"GET", b"keys", self.list_keys),
            (b"POST", b"keys", self.add_key),
            (b"PATCH", b"keys/*", self.patch_key),
            (b"DELETE", b"keys/*", self.delete_key),
        ]

    def authorized(self, request: server.Request) -> bool | None:
        """``None`` when no token is configured, else whether the request carries it."""
        token = self.gateway.config.admin.token
        if not token:
            return None
        raw = request.requestHeaders.getRawHeaders(b"authorization") or [b""]
        expected = b"Bearer " + token.encode("utf-8")
        return hmac.compare_digest(raw[0], expected)

    def render(self, request: server.Request) -> Any:
        ok = self.authorized(request)
        if ok is None:
            write_json(request, 404, error_body(404, "unknown_url", "Unknown request URL."))
            return server.NOT_DONE_YET
        if not ok:
            write_json(
                request,
                401,
                error_body(401, "invalid_admin_token", "Missing or wrong admin token."),
            )
            return server.NOT_DONE_YET
        path = request.path
        if path == b"/metrics":
            return self.not_found(request)
        parts = path[len(b"/admin/") :].strip(b"/").split(b"/")
        for method, pattern, handler in self.routes:
            pat = pattern.split(b"/")
            if len(pat) != len(parts) or request.method != method:
                continue
            args = []
            for want, got in zip(pat, parts, strict=True):
                if want == b"*":
                    args.append(got.decode("utf-8", "replace"))
                elif want != got:
                    break
            else:
                try:
                    status, doc = handler(request, *args)
                except AdminError as e:
                    write_json(request, e.status, error_body(e.status, e.code, e.message))
                    return server.NOT_DONE_YET
                if status == 204:
                    request.setResponseCode(204)
                    request.finish()
                else:
                    write_json(request, status, json.dumps(doc).encode("utf-8"))
                return server.NOT_DONE_YET
        return self.not_found(request)

    def not_found(self, request: server.Request) -> Any:
        write_json(request, 404, error_body(404, "unknown_url", "Unknown admin URL."))
        return server.NOT_DONE_YET

    # -- keys ---------------------------------------------------------------------------

    def _key(self, key_id: str) -> UpstreamKey:
        key = self.gateway.pool.keys.get(key_id)
        if key is None:
            raise AdminError(404, "key_not_found", f"No key with id {key_id!r}.")
        return key

    def list_keys(self, request: server.Request) -> tuple[int, Any]:
        return 200, {"data": [key_object(k) for k in self.gateway.pool.keys.values()]}

    def add_key(self, request: server.Request) -> tuple[int, Any]:
        from yugongd.config import KeyConfig
        from yugongd.state import StoredKey

        doc = _json_body(request)
        pool = self.gateway.pool
        upstream = doc.get("upstream")
        secret = doc.get("key")
        if not isinstance(upstream, str) or upstream not in pool.upstreams:
            raise AdminError(
                400,
                "invalid_upstream",
                f"'upstream' must name a configured upstream: {sorted(pool.upstreams)}.",
            )
        if not isinstance(secret, str) or not secret.strip():
            raise AdminError(400, "invalid_key", "'key' must be the upstream API key.")
        key_id = doc.get("id")
        if key_id is None:
            n = 1
            while f"{upstream}-{n}" in pool.keys:
                n += 1
            key_id = f"{upstream}-{n}"
        if not isinstance(key_id, str) or not key_id:
            raise AdminError(400, "invalid_id", "'id' must be a non-empty string.")
        if key_id in pool.keys:
            raise AdminError(409, "key_exists", f"A key with id {key_id!r} exists.")
        weight = _number(doc, "weight", 1.0, positive=True)
        rpm = _opt_int(doc, "rpm")
        tpm = _opt_int(doc, "tpm")
        models = _models(doc)
        org = doc.get("organization")
        if org is not None and not isinstance(org, str):
            raise AdminError(400, "invalid_organization", "'organization' must be a string.")
        kc = KeyConfig(
            id=key_id,
            key=secret.strip(),
            organization=org,
            weight=weight,
            rpm=rpm,
            tpm=tpm,
            models=models,
        )
        key = pool.add_key(upstream, kc, source="api")
        self.gateway.state.save_key(
            StoredKey(
                upstream=upstream,
                id=key_id,
                key=kc.key,
                organization=org,
                weight=weight,
                rpm=rpm,
                tpm=tpm,
                models=models,
            )
        )
        return 201, key_object(key)

    def patch_key(self, request: server.Request, key_id: str) -> tuple[int, Any]:
        key = self._key(key_id)
        doc = _json_body(request)
        unknown = set(doc) - {"enabled", "weight", "rpm", "tpm", "models"}
        if unknown:
            raise AdminError(
                400, "unknown_field", f"Unknown field(s): {', '.join(sorted(unknown))}."
            )
        if "enabled" in doc:
            if not isinstance(doc["enabled"], bool):
                raise AdminError(400, "invalid_enabled", "'enabled' must be true or false.")
            if doc["enabled"]:
                self.gateway.pool.enable(key)
            else:
                self.gateway.pool.disable(key, "disabled by admin")
        if "weight" in doc:
            key.weight = _number(doc, "weight", 1.0, positive=True)
        if "rpm" in doc:
            key.rpm = _opt_int(doc, "rpm")
        if "tpm" in doc:
            key.tpm = _opt_int(doc, "tpm")
        if "models" in doc:
            key.models = _models(doc)
            self.gateway.pool.keys_changed()
        return 200, key_object(key)

    def delete_key(self, request: server.Request, key_id: str) -> tuple[int, Any]:
        self._key(key_id)
        self.gateway.pool.remove_key(key_id)
        self.gateway.state.delete_key(key_id)
        return 204, None


def _number(doc: dict[str, Any], name: str, default: float, positive: bool = False) -> float:
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or (positive and value <= 0):
        raise AdminError(
            400, f"invalid_{name}", f"'{name}' must be a {'positive ' if positive else ''}number."
        )
    return float(value)


def _opt_int(doc: dict[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AdminError(400, f"invalid_{name}", f"'{name}' must be a non-negative integer.")
    return value


def _models(doc: dict[str, Any]) -> tuple[str, ...]:
    value = doc.get("models", ["*"])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdminError(400, "invalid_models", "'models' must be a list of glob patterns.")
    return tuple(value) or ("*",)
