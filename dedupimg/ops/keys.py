"""``key list / add / remove / passwd``: an encrypted repository's key objects, as restic's ``key`` commands.

Every key object wraps the same master keys under one password (repo/keys.py). The caller opens the repository
with a password (that key is "current") and, to change keys, holds its EXCLUSIVE lock. A new key is written
durably before any key is removed, so a crash leaves one key too many, never none.
"""

from __future__ import annotations

from dedupimg.core.errors import UsageError
from dedupimg.core.password import NEW_KEY, PasswordSource
from dedupimg.repo import keys
from dedupimg.repo.keys import KeyInfo
from dedupimg.repo.repository import Repository

__all__ = ["KeyInfo", "add_key", "change_password", "key_id", "list_keys", "remove_key", "short_id"]


def key_id(name: str) -> str:
    """The id of key object ``keys/<64 hex>``: its 64 hex digits."""
    return name.removeprefix(keys.KEYS_PREFIX)


def short_id(name: str) -> str:
    return key_id(name)[:8]


def _unlocked(repo: Repository) -> keys.Unlocked:
    if repo.unlocked is None:
        raise UsageError(f"{repo.location} is not encrypted: it has no keys")
    return repo.unlocked


def list_keys(repo: Repository) -> list[KeyInfo]:
    """Every key object, the one this repository was opened with marked ``current``."""
    return keys.list_keys(repo.store, _unlocked(repo))


def add_key(repo: Repository, password: PasswordSource = NEW_KEY) -> str:
    """Write (durably) a key object for the password of ``password`` (asked twice on a terminal); returns its
    name (``keys/<64 hex>``)."""
    unlocked = _unlocked(repo)
    secret = password.get("new password", confirm=True)
    return keys.add_key(repo.store, unlocked.master, unlocked.aead, secret)


def remove_key(repo: Repository, ref: str) -> str:
    """Delete the key whose id starts with ``ref``: never the last one, nor the one this command was opened with
    (as restic: to remove it, open the repository with another key's password)."""
    unlocked = _unlocked(repo)
    name = keys.resolve_key(repo.store, ref)
    if name == unlocked.key_name and len(keys.key_names(repo.store)) > 1:  # the only key: remove_key says so
        raise UsageError(f"refusing to remove the key this command was opened with ({short_id(name)}); open with "
                         "another password")
    keys.remove_key(repo.store, name)
    return name


def change_password(repo: Repository, password: PasswordSource = NEW_KEY) -> tuple[str, str]:
    """Replace the current key by one for the new password; returns (added, removed). The new key is durable
    before the old one goes: a crash in between leaves both, and either password opens the repository."""
    current = _unlocked(repo).key_name
    added = add_key(repo, password)
    keys.remove_key(repo.store, current)
    return added, current
