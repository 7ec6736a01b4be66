"""The admin API: JSON over the client listener, behind ``admin.token``.

Without a configured token every admin path answers 404, as if it did not exist; a
wrong token is 401. The token is compared in constant time.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from yugongd.errors import error_body, write_json
from yugongd.model import Account
from yugongd.pool import UpstreamKey
from yugongd.site import read_body
from yugongd.state import StoredKey

if TYPE_CHECKING:
    from yugongd.gateway import Gateway
    from yugongd.state import UsageLine

log = Logger()


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
        self.accounts = AccountsAdmin(gateway)
        self.routes: list[tuple[bytes, bytes, Callable[..., Any]]] = [
            (b"GET", b"keys", self.list_keys),
            (b"POST", b"keys", self.add_key),
            (b"PATCH", b"keys/*", self.patch_key),
            (b"DELETE", b"keys/*", self.delete_key),
            (b"GET", b"accounts", self.accounts.list),
            (b"POST", b"accounts", self.accounts.create),
            (b"GET", b"accounts/*", self.accounts.show),
            (b"PATCH", b"accounts/*", self.accounts.patch),
            (b"DELETE", b"accounts/*", self.accounts.delete),
            (b"POST", b"accounts/*/rotate", self.accounts.rotate),
            (b"GET", b"usage", self.accounts.usage),
        ]

    def authorized(self, request: server.Request) -> bool | None:
        """``None`` when no token is configured, else whether the request carries it."""
        token = self.gateway.config.admin.token
        if not token:
            return None
        raw = request.requestHeaders.getRawHeaders(b"authorization") or [b""]
        expected = b"Bearer " + token.encode("utf-8")
        return hmac.compare_digest(raw[0], expected)

    def refused(self, request: server.Request) -> bool:
        """Answer 404 (no token configured) or 401 (wrong token) and say so; the admin
        routes and ``/metrics`` share this gate."""
        ok = self.authorized(request)
        if ok is None:
            write_json(request, 404, error_body(404, "unknown_url", "Unknown request URL."))
            return True
        if not ok:
            write_json(
                request,
                401,
                error_body(401, "invalid_admin_token", "Missing or wrong admin token."),
            )
            return True
        return False

    def render(self, request: server.Request) -> Any:
        if self.refused(request):
            return server.NOT_DONE_YET
        path = request.path
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
                # a handler answers ``(status, doc)``, or a Deferred that fires with it
                d = defer.maybeDeferred(handler, request, *args)
                d.addCallbacks(
                    self._answer, self._failed, callbackArgs=(request,), errbackArgs=(request,)
                )
                return server.NOT_DONE_YET
        return self.not_found(request)

    def _answer(self, result: tuple[int, Any], request: server.Request) -> None:
        if getattr(request, "_disconnected", False) or request.finished:
            return
        status, doc = result
        if status == 204:
            request.setResponseCode(204)
            request.finish()
        else:
            write_json(request, status, json.dumps(doc).encode("utf-8"))

    def _failed(self, reason: Failure, request: server.Request) -> None:
        if reason.check(AdminError):
            e: AdminError = reason.value  # type: ignore[assignment]
            status, body = e.status, error_body(e.status, e.code, e.message)
        else:
            log.failure("admin request {path} failed", reason, path=request.path)
            status = 500
            body = error_body(500, "internal_error", "The admin request failed.")
        if not (getattr(request, "_disconnected", False) or request.finished):
            write_json(request, status, body)

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
        if {"rpm", "tpm", "models"} & set(doc):
            self.gateway.pool.keys_changed()
        if key.source == "api":
            self.gateway.state.save_key(
                StoredKey(
                    upstream=key.upstream,
                    id=key.id,
                    key=key.secret,
                    organization=key.organization,
                    weight=key.weight,
                    rpm=key.rpm,
                    tpm=key.tpm,
                    models=key.models,
                )
            )
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


# -- accounts and usage ------------------------------------------------------------------

_ACCOUNT_FIELDS = frozenset(
    {"name", "models", "rpm", "tpm", "credit_usd", "expires", "ip_allow", "enabled"}
)


def parse_time(value: object, name: str) -> float:
    """Unix seconds from a number, a numeric string, or an ISO 8601 date or date-time
    (UTC when it names no zone)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if when.tzinfo is None:
                when = when.replace(tzinfo=datetime.timezone.utc)
            return when.timestamp()
    raise AdminError(
        400,
        f"invalid_{name}",
        f"'{name}' must be unix seconds or an ISO 8601 date like '2027-01-01T00:00:00Z'.",
    )


def _iso(when: datetime.datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _query_arg(request: server.Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    if not values or not values[0]:
        return None
    return values[0].decode("utf-8", "replace")


class AccountsAdmin:
    """``/admin/accounts…`` and ``/admin/usage``.

    Changes apply to the next request at once (the hot path reads the in-memory
    :class:`~yugongd.accounts.AccountStore`) and are written behind to the state store.
    Account keys are shown once, in the answer to create and rotate; never their hash.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def _account(self, account_id: str) -> Account:
        account = self.gateway.accounts.by_id.get(account_id)
        if account is None:
            raise AdminError(404, "account_not_found", f"No account with id {account_id!r}.")
        return account

    def account_object(self, account: Account, detail: bool = False) -> dict[str, Any]:
        gw = self.gateway
        used = gw.ledger.used_usd(account.id)
        remaining = None
        if account.credit_usd is not None:
            remaining = max(0.0, account.credit_usd - used)
        doc: dict[str, Any] = {
            "id": account.id,
            "object": "account",
            "name": account.name,
            "models": list(account.models),
            "rpm": account.rpm,
            "tpm": account.tpm,
            "credit_usd": account.credit_usd,
            "expires": _iso(account.expires),
            "ip_allow": [str(n) for n in account.ip_allow],
            "enabled": account.enabled,
            "source": account.source,
            "used_usd": used,
            "remaining_usd": remaining,
        }
        if detail:
            totals = gw.ledger.totals.get(account.id)
            doc["usage"] = {
                "requests": totals.requests if totals else 0,
                "prompt_tokens": totals.prompt_tokens if totals else 0,
                "completion_tokens": totals.completion_tokens if totals else 0,
            }
            doc["reserved_usd"] = gw.accounts.credit.held(account.id)
            doc["inflight"] = gw.accounts.credit.inflight(account.id)
        return doc

    def list(self, request: server.Request) -> tuple[int, Any]:
        accounts = self.gateway.accounts.by_id.values()
        return 200, {"object": "list", "data": [self.account_object(a) for a in accounts]}

    def show(self, request: server.Request, account_id: str) -> tuple[int, Any]:
        return 200, self.account_object(self._account(account_id), detail=True)

    def _changes(
        self, doc: dict[str, Any], creating: bool, account_id: str | None = None
    ) -> dict[str, Any]:
        """Validated account fields of a create or patch body."""
        allowed = _ACCOUNT_FIELDS | ({"add_credit_usd"} if not creating else set())
        unknown = set(doc) - allowed
        if unknown:
            raise AdminError(
                400, "unknown_field", f"Unknown field(s): {', '.join(sorted(unknown))}."
            )
        out: dict[str, Any] = {}
        if "name" in doc or creating:
            name = doc.get("name")
            if not isinstance(name, str) or not name.strip() or len(name) > 200:
                raise AdminError(400, "invalid_name", "'name' must be a non-empty string.")
            name = name.strip()
            other = self.gateway.accounts.by_name(name)
            if other is not None and other.id != account_id:
                raise AdminError(409, "account_exists", f"An account named {name!r} exists.")
            out["name"] = name
        if "models" in doc:
            out["models"] = _models(doc)
        for limit in ("rpm", "tpm"):
            if limit in doc:
                out[limit] = _opt_int(doc, limit) or 0
        if "credit_usd" in doc:
            credit = doc["credit_usd"]
            if credit is not None:
                credit = _number(doc, "credit_usd", 0.0)
                if credit < 0:
                    raise AdminError(400, "invalid_credit_usd", "'credit_usd' must be >= 0.")
            out["credit_usd"] = credit
        if "expires" in doc:
            value = doc["expires"]
            out["expires"] = (
                None
                if value is None
                else datetime.datetime.fromtimestamp(
                    parse_time(value, "expires"), datetime.timezone.utc
                )
            )
        if "ip_allow" in doc:
            value = doc["ip_allow"]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise AdminError(400, "invalid_ip_allow", "'ip_allow' must be a list of CIDRs.")
            try:
                out["ip_allow"] = tuple(
                    ipaddress.ip_network(v.strip(), strict=False) for v in value
                )
            except ValueError as e:
                raise AdminError(400, "invalid_ip_allow", f"'ip_allow': {e}.") from None
        if "enabled" in doc:
            if not isinstance(doc["enabled"], bool):
                raise AdminError(400, "invalid_enabled", "'enabled' must be true or false.")
            out["enabled"] = doc["enabled"]
        return out

    def create(self, request: server.Request) -> tuple[int, Any]:
        from yugongd.accounts import hash_key, new_account_id, new_account_key

        changes = self._changes(_json_body(request), creating=True)
        key = new_account_key()
        account = attrs.evolve(
            Account(id=new_account_id(), name=changes["name"], source="api"),
            key_hash=hash_key(key),
            **{k: v for k, v in changes.items() if k != "name"},
        )
        self.gateway.accounts.put(account)
        self.gateway.state.save_account(account)
        doc = self.account_object(account)
        doc["key"] = key
        return 201, doc

    def patch(self, request: server.Request, account_id: str) -> tuple[int, Any]:
        account = self._account(account_id)
        doc = _json_body(request)
        if account.source == "config" and "name" in doc:
            raise AdminError(
                409,
                "config_account",
                "This account comes from the config file: rename it there.",
            )
        changes = self._changes(doc, creating=False, account_id=account_id)
        if "add_credit_usd" in doc:
            top_up = _number(doc, "add_credit_usd", 0.0)
            base = changes.get("credit_usd", account.credit_usd)
            if base is None:
                raise AdminError(
                    400, "invalid_add_credit_usd", "The account's credit is unlimited."
                )
            changes["credit_usd"] = max(0.0, base + top_up)
        updated = attrs.evolve(account, **changes)
        self.gateway.accounts.put(updated)
        self.gateway.state.save_account(updated)
        return 200, self.account_object(updated, detail=True)

    def delete(self, request: server.Request, account_id: str) -> tuple[int, Any]:
        account = self._account(account_id)
        if account.source == "config":
            raise AdminError(
                409,
                "config_account",
                "This account comes from the config file: remove it there and reload.",
            )
        self.gateway.accounts.remove(account_id)
        self.gateway.state.delete_account(account_id)
        return 204, None

    def rotate(self, request: server.Request, account_id: str) -> tuple[int, Any]:
        from yugongd.accounts import hash_key, new_account_key

        account = self._account(account_id)
        if account.source == "config":
            raise AdminError(
                409,
                "config_account",
                "This account's key is set in the config file: change it there and reload.",
            )
        key = new_account_key()
        updated = attrs.evolve(account, key_hash=hash_key(key))
        self.gateway.accounts.put(updated)
        self.gateway.state.save_account(updated)
        doc = self.account_object(updated)
        doc["key"] = key
        return 200, doc

    def usage(self, request: server.Request) -> defer.Deferred[tuple[int, Any]]:
        gw = self.gateway
        wanted = _query_arg(request, "account")
        account_id = None
        if wanted is not None:
            found = gw.accounts.by_id.get(wanted) or gw.accounts.by_name(wanted)
            # an account deleted since keeps its ledger rows: accept its bare id too
            account_id = found.id if found is not None else wanted
        since_arg = _query_arg(request, "since")
        until_arg = _query_arg(request, "until")
        since = parse_time(since_arg, "since") if since_arg is not None else None
        until = parse_time(until_arg, "until") if until_arg is not None else None

        def answer(lines: list[UsageLine]) -> tuple[int, Any]:
            data = []
            total = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
            for line in lines:
                account = gw.accounts.by_id.get(line.account_id)
                data.append(
                    {
                        "account": line.account_id,
                        "name": account.name if account is not None else None,
                        "model": line.model,
                        "requests": line.requests,
                        "prompt_tokens": line.prompt_tokens,
                        "completion_tokens": line.completion_tokens,
                        "total_tokens": line.prompt_tokens + line.completion_tokens,
                        "cost_usd": line.cost_usd,
                        "estimated_requests": line.estimated,
                    }
                )
                total["requests"] += line.requests
                total["prompt_tokens"] += line.prompt_tokens
                total["completion_tokens"] += line.completion_tokens
                total["cost_usd"] += line.cost_usd
            return 200, {
                "object": "list",
                "since": since,
                "until": until,
                "data": data,
                "total": total,
            }

        return gw.state.summarize(account_id, since, until, by_day=False).addCallback(answer)
