"""``yugongd``: the admin command line, a thin client of the admin API.

It talks HTTP to a running daemon (standard library only): ``--url`` or ``YUGONGD_URL``
(default ``http://127.0.0.1:8080``) and ``--token`` or ``YUGONGD_ADMIN_TOKEN``. Prefer the
environment variable for the token: a command-line argument is visible to every user
of the machine in ``ps``.

Exit codes: 0 done; 1 the daemon refused or failed the request (the message says why);
2 a usage error (bad arguments, no token); 3 the daemon could not be reached.

Examples::

    yugongd keys list
    yugongd keys add --upstream openai --id team-c < keyfile
    yugongd keys disable team-c
    yugongd accounts create carol --models 'gpt-4o-mini,text-embedding-3-*' --credit 20
    yugongd accounts top-up carol 10
    yugongd usage --since 2025-01-01 --until 2025-02-01
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

DEFAULT_URL = "http://127.0.0.1:8080"

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CLIError(Exception):
    """A problem to print as one line, with the exit code it means."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class AdminClient:
    """The admin API over ``urllib``."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, query: dict | None = None
    ) -> Any:
        url = self.url + path
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                url += "?" + urllib.parse.urlencode(q)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raise self._http_error(method, path, e.code, e.read()) from None
        except urllib.error.URLError as e:
            reason = e.reason if isinstance(e.reason, str) else str(e.reason)
            raise CLIError(
                f"cannot reach yugongd at {self.url}: {reason}", EXIT_UNREACHABLE
            ) from None
        except (ConnectionError, TimeoutError, OSError) as e:
            raise CLIError(f"cannot reach yugongd at {self.url}: {e}", EXIT_UNREACHABLE) from None
        if status == 204 or not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise CLIError(
                f"{self.url} answered {method} {path} with something that is not JSON: "
                "is it yugongd?"
            ) from None

    def _http_error(self, method: str, path: str, status: int, raw: bytes) -> CLIError:
        message = code = None
        try:
            err = json.loads(raw).get("error") or {}
            message, code = err.get("message"), err.get("code")
        except (ValueError, AttributeError):
            pass
        if status == 401:
            return CLIError(
                f"yugongd at {self.url} refused the admin token (401): check --token or "
                "YUGONGD_ADMIN_TOKEN"
            )
        if status == 404 and code == "unknown_url":
            return CLIError(
                f"{method} {path}: not found (404) at {self.url}: the admin API is off (no "
                "admin.token in the daemon's config) or this daemon does not have it yet"
            )
        detail = message or raw.decode("utf-8", "replace")[:200] or "no details"
        return CLIError(f"{method} {path}: {detail} ({status}{', ' + code if code else ''})")


# -- output -----------------------------------------------------------------------------


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], out: TextIO) -> None:
    """Columns padded to fit; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in header]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows)
        and bool(rows)
        for i in range(len(header))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    print(line(header), file=out)
    for row in cells:
        print(line(row), file=out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.2f}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def show_object(doc: dict[str, Any], out: TextIO, skip: tuple[str, ...] = ()) -> None:
    width = max((len(k) for k in doc), default=0)
    for k, v in doc.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{ik}={_cell(iv)}" for ik, iv in v.items())
        print(f"{k.ljust(width)}  {_cell(v)}", file=out)


# -- commands ---------------------------------------------------------------------------


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def keys_list(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    doc = api.request("GET", "/admin/keys")
    if args.json:
        print(json.dumps(doc, indent=2), file=out)
        return
    rows = [
        [
            k.get("id"),
            k.get("upstream"),
            k.get("state"),
            k.get("inflight"),
            k.get("requests"),
            k.get("failures"),
            k.get("remaining_requests"),
            k.get("remaining_tokens"),
            k.get("key_hint"),
            k.get("disabled_reason") or k.get("last_error"),
        ]
        for k in doc.get("data", [])
    ]
    header = [
        "ID",
        "UPSTREAM",
        "STATE",
        "INFLIGHT",
        "REQUESTS",
        "FAILURES",
        "REM_REQ",
        "REM_TOK",
        "KEY",
        "LAST_ERROR",
    ]
    table(rows, header, out)


def _read_secret(args: argparse.Namespace) -> str:
    if args.key is not None and args.key != "-":
        return str(args.key)
    if sys.stdin.isatty():
        secret = getpass.getpass("upstream API key: ")
    else:
        secret = sys.stdin.readline()
    secret = secret.strip()
    if not secret:
        raise CLIError("no key given (pass --key, or the key on stdin)", EXIT_USAGE)
    return secret


def keys_add(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    body: dict[str, Any] = {"upstream": args.upstream, "key": _read_secret(args)}
    for name in ("id", "weight", "rpm", "tpm", "organization"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.models is not None:
        body["models"] = _csv(args.models)
    doc = api.request("POST", "/admin/keys", body)
    print(f"added key {doc.get('id')} ({doc.get('key_hint')}) to {doc.get('upstream')}", file=out)


def _keys_enabled(enabled: bool) -> Callable[[AdminClient, argparse.Namespace, TextIO], None]:
    def run(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
        doc = api.request("PATCH", f"/admin/keys/{_quote(args.id)}", {"enabled": enabled})
        print(f"key {doc.get('id')}: {doc.get('state')}", file=out)

    return run


def keys_remove(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    api.request("DELETE", f"/admin/keys/{_quote(args.id)}")
    print(f"removed key {args.id}", file=out)


def _find_account(api: AdminClient, ref: str) -> dict[str, Any]:
    """An account by id, or else by name."""
    try:
        return dict(api.request("GET", f"/admin/accounts/{_quote(ref)}"))
    except CLIError as e:
        if "(404" not in e.message:
            raise
    for account in api.request("GET", "/admin/accounts").get("data", []):
        if account.get("name") == ref:
            return dict(api.request("GET", f"/admin/accounts/{_quote(account['id'])}"))
    raise CLIError(f"no account with id or name {ref!r}")


def _account_fields(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.models is not None:
        body["models"] = _csv(args.models)
    for name in ("rpm", "tpm", "expires"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.credit is not None:
        body["credit_usd"] = args.credit
    if args.ip_allow is not None:
        body["ip_allow"] = _csv(args.ip_allow)
    return body


def _print_new_key(doc: dict[str, Any], out: TextIO) -> None:
    print(f"key: {doc.get('key')}", file=out)
    print("(shown once: store it now; yugongd keeps only its hash)", file=out)


def accounts_create(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    doc = api.request("POST", "/admin/accounts", {"name": args.name, **_account_fields(args)})
    if args.json:
        print(json.dumps(doc, indent=2), file=out)
        return
    print(f"created account {doc.get('name')} (id {doc.get('id')})", file=out)
    _print_new_key(doc, out)


def accounts_list(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    doc = api.request("GET", "/admin/accounts")
    if args.json:
        print(json.dumps(doc, indent=2), file=out)
        return
    rows = [
        [
            a.get("id"),
            a.get("name"),
            a.get("enabled"),
            a.get("models"),
            a.get("rpm"),
            a.get("tpm"),
            a.get("credit_usd"),
            a.get("used_usd"),
            a.get("remaining_usd"),
            a.get("expires"),
        ]
        for a in doc.get("data", [])
    ]
    header = [
        "ID",
        "NAME",
        "ENABLED",
        "MODELS",
        "RPM",
        "TPM",
        "CREDIT_USD",
        "USED_USD",
        "REMAINING_USD",
        "EXPIRES",
    ]
    table(rows, header, out)


def accounts_show(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    doc = _find_account(api, args.account)
    if args.json:
        print(json.dumps(doc, indent=2), file=out)
    else:
        show_object(doc, out)


def accounts_update(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    account = _find_account(api, args.account)
    body = _account_fields(args)
    if not body:
        raise CLIError("nothing to change: give --models, --rpm, --tpm, --credit …", EXIT_USAGE)
    doc = api.request("PATCH", f"/admin/accounts/{_quote(account['id'])}", body)
    show_object(doc, out)


def accounts_top_up(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    account = _find_account(api, args.account)
    current = account.get("credit_usd")
    if current is None:
        raise CLIError(
            f"account {account.get('name')} has unlimited credit: set a limit with "
            "'accounts update --credit' first"
        )
    credit = round(float(current) + args.amount, 9)
    if credit < 0:
        raise CLIError(f"the credit would go below zero ({credit:.2f})", EXIT_USAGE)
    doc = api.request("PATCH", f"/admin/accounts/{_quote(account['id'])}", {"credit_usd": credit})
    remaining = doc.get("remaining_usd")
    print(
        f"account {doc.get('name')}: credit {current:.2f} -> {doc.get('credit_usd'):.2f} USD"
        + (f", {remaining:.2f} left" if isinstance(remaining, int | float) else ""),
        file=out,
    )


def accounts_rotate(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    account = _find_account(api, args.account)
    doc = api.request("POST", f"/admin/accounts/{_quote(account['id'])}/rotate")
    print(f"account {doc.get('name')}: new key; the old one no longer works", file=out)
    _print_new_key(doc, out)


def _accounts_enabled(enabled: bool) -> Callable[[AdminClient, argparse.Namespace, TextIO], None]:
    def run(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
        account = _find_account(api, args.account)
        doc = api.request("PATCH", f"/admin/accounts/{_quote(account['id'])}", {"enabled": enabled})
        state = "enabled" if doc.get("enabled") else "disabled"
        print(f"account {doc.get('name')}: {state}", file=out)

    return run


def accounts_delete(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    account = _find_account(api, args.account)
    api.request("DELETE", f"/admin/accounts/{_quote(account['id'])}")
    print(f"deleted account {account.get('name')} (its ledger rows are kept)", file=out)


def usage_report(api: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    query = {"since": args.since, "until": args.until, "account": args.account}
    doc = api.request("GET", "/admin/usage", query=query)
    if args.json:
        print(json.dumps(doc, indent=2), file=out)
        return
    rows = []
    totals = [0, 0, 0, 0.0]
    for line in doc.get("data", []):
        requests = line.get("requests", 0)
        prompt = line.get("prompt_tokens", 0)
        completion = line.get("completion_tokens", 0)
        cost = float(line.get("cost_usd", 0.0))
        rows.append(
            [
                line.get("name") or line.get("account"),
                line.get("model") or "-",
                requests,
                prompt,
                completion,
                cost,
            ]
        )
        totals = [
            totals[0] + requests,
            totals[1] + prompt,
            totals[2] + completion,
            totals[3] + cost,
        ]
    rows.sort(key=lambda r: (str(r[0]), str(r[1])))
    rows.append(["TOTAL", "", *totals])
    table(
        rows,
        ["ACCOUNT", "MODEL", "REQUESTS", "PROMPT_TOKENS", "COMPLETION_TOKENS", "COST_USD"],
        out,
    )


# -- the parser -------------------------------------------------------------------------


def _account_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="comma-separated model globs (default: all)")
    p.add_argument("--rpm", type=int, help="requests per minute, 0 = unlimited")
    p.add_argument("--tpm", type=int, help="tokens per minute, 0 = unlimited")
    p.add_argument("--credit", type=float, help="spend limit in USD (default: unlimited)")
    p.add_argument("--expires", help="ISO 8601 date-time, e.g. 2027-01-01T00:00:00Z")
    p.add_argument("--ip-allow", help="comma-separated client addresses/CIDRs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yugongd",
        description="Manage a running yugongd through its admin API.",
        epilog="Exit codes: 0 done, 1 refused by the daemon, 2 usage error, 3 unreachable.",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("YUGONGD_URL", DEFAULT_URL),
        help="the daemon's base URL (env YUGONGD_URL, default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="the admin token (env YUGONGD_ADMIN_TOKEN; prefer the environment: an "
        "argument is visible in ps)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keys = sub.add_parser("keys", help="upstream keys of the pool").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = keys.add_parser("list", help="every key with its state")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(run=keys_list)
    p = keys.add_parser("add", help="add a key (read from stdin unless --key)")
    p.add_argument("--upstream", required=True, help="name of a configured upstream")
    p.add_argument("--key", help="the upstream API key; '-' or omitted: read it from stdin")
    p.add_argument("--id", help="stable label (default: upstream name + number)")
    p.add_argument("--weight", type=float)
    p.add_argument("--rpm", type=int)
    p.add_argument("--tpm", type=int)
    p.add_argument("--organization")
    p.add_argument("--models", help="comma-separated model globs (default: all)")
    p.set_defaults(run=keys_add)
    for name, enabled in (("enable", True), ("disable", False)):
        p = keys.add_parser(name, help=f"{name} a key")
        p.add_argument("id")
        p.set_defaults(run=_keys_enabled(enabled))
    p = keys.add_parser("remove", help="remove a key added through the API")
    p.add_argument("id")
    p.set_defaults(run=keys_remove)

    accounts = sub.add_parser("accounts", help="sub-accounts").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = accounts.add_parser("create", help="create an account; prints its key once")
    p.add_argument("name")
    _account_options(p)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(run=accounts_create)
    p = accounts.add_parser("list", help="every account with its credit")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(run=accounts_list)
    p = accounts.add_parser("show", help="one account with its usage")
    p.add_argument("account", help="id or name")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(run=accounts_show)
    p = accounts.add_parser("update", help="change limits, models, credit, expiry")
    p.add_argument("account", help="id or name")
    _account_options(p)
    p.set_defaults(run=accounts_update)
    p = accounts.add_parser("top-up", help="add USD to an account's credit")
    p.add_argument("account", help="id or name")
    p.add_argument("amount", type=float, help="USD to add (negative to take back)")
    p.set_defaults(run=accounts_top_up)
    p = accounts.add_parser("rotate", help="give the account a new key; prints it once")
    p.add_argument("account", help="id or name")
    p.set_defaults(run=accounts_rotate)
    for name, enabled in (("enable", True), ("disable", False)):
        p = accounts.add_parser(name, help=f"{name} an account")
        p.add_argument("account", help="id or name")
        p.set_defaults(run=_accounts_enabled(enabled))
    p = accounts.add_parser("delete", help="delete an account created through the API")
    p.add_argument("account", help="id or name")
    p.set_defaults(run=accounts_delete)

    p = sub.add_parser(
        "migrate",
        help="copy a SQLite state (accounts, keys, ledger) into Redis, for cluster mode",
        description="Copy the accounts, the keys added at runtime and every ledger row of a "
        "SQLite state file into a Redis database, once, before starting processes with "
        'state: "redis://…". Safe to run again: rows already copied are not copied twice. '
        "Stop the daemon that uses the SQLite file first. Needs no admin token.",
    )
    p.add_argument("--from", dest="source", required=True, help="sqlite:PATH or PATH")
    p.add_argument("--to", dest="target", required=True, help="redis://host:port/db")
    p.set_defaults(run=None)

    p = sub.add_parser("usage", help="usage by account and model over a date range")
    p.add_argument("--since", help="start: ISO 8601 date or date-time, or unix seconds")
    p.add_argument("--until", help="end (exclusive): ISO 8601 date or date-time, or unix seconds")
    p.add_argument("--account", help="only this account (id or name)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(run=usage_report)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "migrate":
        return migrate(args.source, args.target, out)
    token = args.token or os.environ.get("YUGONGD_ADMIN_TOKEN", "").strip()
    if not token:
        return _fail("no admin token: set YUGONGD_ADMIN_TOKEN (or pass --token)", EXIT_USAGE)
    api = AdminClient(args.url, token, timeout=args.timeout)
    try:
        args.run(api, args, out)
    except CLIError as e:
        return _fail(e.message, e.code)
    except KeyboardInterrupt:
        return 130
    return 0


def migrate(source: str, target: str, out: TextIO) -> int:
    """``yugongd migrate --from sqlite:PATH --to redis://…``."""
    from twisted.internet import task

    from yugongd.config import parse_redis_url

    path = source[len("sqlite:") :] if source.startswith("sqlite:") else source
    if not os.path.isfile(path):
        return _fail(f"migrate: {path}: no such SQLite file", EXIT_USAGE)
    try:
        parse_redis_url(target)
    except ValueError as e:
        return _fail(f"migrate: {e}", EXIT_USAGE)
    result: list[int] = []

    async def run(reactor: Any) -> None:
        from yugongd.redisstate import migrate as copy

        result.append(await copy(path, target, reactor, lambda line: print(line, file=out)))

    try:
        task.react(run)
    except SystemExit as e:
        if e.code not in (0, None):
            return _fail(f"migrate: could not copy {path} to {target}", EXIT_UNREACHABLE)
    return result[0] if result else EXIT_UNREACHABLE


def _fail(message: str, code: int) -> int:
    print(f"yugongd: {message}", file=sys.stderr)
    return code


def _main() -> NoReturn:  # pragma: no cover - the console script's wrapper does this
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _main()
