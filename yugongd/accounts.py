"""Sub-accounts: the in-memory index the hot path authenticates against.

Account keys are never stored: only their SHA-256 digest, which is also the index, so a
lookup costs one hash and one dict access, and the final comparison is constant-time.

Accounts come from the config file (upserted by name at start and on every reload) and
from the admin API (kept in the state store). A config account changed through the admin
API (``PATCH``) keeps that change — across reloads and restarts — for as long as its
entry in the config file stays the same; once the entry is edited, the file wins again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING

from yugongd.limits import CreditBook
from yugongd.model import Account

if TYPE_CHECKING:
    from yugongd.config import AccountConfig

KEY_PREFIX = "sk-yg-"


def hash_key(token: str) -> str:
    """The stored form of an account key."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_account_key() -> str:
    """A fresh account key: ``sk-yg-`` and 48 random URL-safe characters."""
    return KEY_PREFIX + secrets.token_urlsafe(36)


def config_account_id(name: str) -> str:
    """Accounts from the config file get an id derived from their name, stable across restarts."""
    return "acct_" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


def new_account_id() -> str:
    return "acct_" + secrets.token_hex(8)


def config_digest(ac: AccountConfig) -> str:
    """A digest of a config file entry: what a runtime override of it is tied to."""
    text = repr(
        (
            ac.name,
            hash_key(ac.key),
            ac.models,
            ac.rpm,
            ac.tpm,
            ac.credit_usd,
            ac.expires.isoformat() if ac.expires else None,
            tuple(str(n) for n in ac.ip_allow),
            ac.enabled,
        )
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def account_from_config(ac: AccountConfig) -> Account:
    return Account(
        id=config_account_id(ac.name),
        name=ac.name,
        key_hash=hash_key(ac.key),
        models=ac.models,
        rpm=ac.rpm,
        tpm=ac.tpm,
        credit_usd=ac.credit_usd,
        expires=ac.expires,
        ip_allow=ac.ip_allow,
        enabled=ac.enabled,
        source="config",
        config_hash=config_digest(ac),
    )


class AccountStore:
    """Every account, by id and by key digest."""

    def __init__(self) -> None:
        self.by_id: dict[str, Account] = {}
        self._by_hash: dict[str, Account] = {}
        #: credit reserved by the requests in flight
        self.credit = CreditBook()
        #: ids of config accounts whose stored override the last :meth:`configure`
        #: dropped (the entry changed or went away); the accounts plugin deletes them
        #: from the state store
        self.dropped: list[str] = []

    def __len__(self) -> int:
        return len(self.by_id)

    def lookup(self, token: str) -> Account | None:
        """The account whose key is ``token``, or ``None``."""
        digest = hash_key(token)
        account = self._by_hash.get(digest)
        if account is None or not hmac.compare_digest(account.key_hash, digest):
            return None
        return account

    def put(self, account: Account) -> None:
        old = self.by_id.get(account.id)
        if old is not None:
            self._by_hash.pop(old.key_hash, None)
        self.by_id[account.id] = account
        if account.key_hash:
            self._by_hash[account.key_hash] = account

    def remove(self, account_id: str) -> Account | None:
        account = self.by_id.pop(account_id, None)
        if account is not None:
            self._by_hash.pop(account.key_hash, None)
        return account

    def by_name(self, name: str) -> Account | None:
        for account in self.by_id.values():
            if account.name == name:
                return account
        return None

    def configure(self, accounts: Iterable[AccountConfig]) -> None:
        """Upsert the config file's accounts by name; drop config accounts no longer listed.

        Accounts created through the admin API are left alone. A config account that
        was changed at runtime keeps the change while its entry is the same as when the
        change was made (same :attr:`~yugongd.model.Account.config_hash`).
        """
        wanted = {config_account_id(ac.name): account_from_config(ac) for ac in accounts}
        for account in list(self.by_id.values()):
            if account.source == "config" and account.id not in wanted:
                self.remove(account.id)
                self.dropped.append(account.id)
        for account in wanted.values():
            old = self.by_id.get(account.id)
            if old is not None and old.source == "config" and old != account:
                if old.config_hash == account.config_hash:
                    continue  # a runtime override of an unchanged entry: keep it
                self.dropped.append(account.id)
            self.put(account)
