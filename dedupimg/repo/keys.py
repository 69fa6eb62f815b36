"""An encrypted repository's key objects (``keys/<64 hex>``) and its sealed config.

Each key object wraps the one set of master keys under a password (core/crypto.py). Opening tries the
password on every key object; ``key add / remove / passwd`` write and delete them. A key object is written
(durable) before anything depends on it and deleted only after its replacement is durable, so a crash leaves
at most one key too many, never none.
"""

from __future__ import annotations

import getpass
import socket
import time
from dataclasses import dataclass, replace
from typing import Any

import blake3

from dedupimg.core.config import Config, SealedConfig
from dedupimg.core.crypto import Aead, KeyObject, MasterKeys, wrap_keys
from dedupimg.core.errors import IntegrityError, UnsupportedFormat, UsageError, WrongPassword
from dedupimg.core.password import PasswordSource
from dedupimg.repo.pack import SealedFormat
from dedupimg.store import Store
from dedupimg.store.base import ObjectMissing, write_object

KEYS_PREFIX = "keys/"
CONFIG_AD = b"DIMGCF2"


@dataclass(frozen=True)
class Unlocked:
    """What the password opened: the master keys, through the key object ``key_name``."""

    master: MasterKeys
    key_name: str
    aead: str


@dataclass(frozen=True)
class KeyInfo:
    name: str  # keys/<64 hex>
    current: bool  # the key this command was opened with
    info: dict[str, Any]

    @property
    def short_id(self) -> str:
        return self.name.removeprefix(KEYS_PREFIX)[:8]


def key_names(store: Store) -> list[str]:
    return sorted(o.name for o in store.list(KEYS_PREFIX).objects)


def _read_key(store: Store, name: str) -> KeyObject:
    where = store.location(name)
    data = store.read(name, where=where)
    if KEYS_PREFIX + blake3.blake3(data).hexdigest() != name:
        raise IntegrityError(f"{where}: key object does not match its name (damaged)")
    return KeyObject.parse(data, where)


def unlock(store: Store, password: bytes) -> Unlocked:
    """The master keys the password opens; WrongPassword when it opens no key object."""
    names = key_names(store)
    if not names:
        raise UnsupportedFormat(f"{store.location('').rstrip('/')}: an encrypted repository without key objects "
                                "(keys/ is empty): it cannot be opened")
    damaged: list[str] = []
    for name in names:
        try:
            key = _read_key(store, name)
            master = key.unwrap(password)
        except (IntegrityError, UnsupportedFormat, ObjectMissing) as exc:
            damaged.append(str(exc))  # one damaged or planted key object does not hide the others
            continue
        if master is not None:
            return Unlocked(master, name, key.aead)
    if damaged and len(damaged) == len(names):
        raise IntegrityError(damaged[0])
    raise WrongPassword("wrong password: no key of the repository opens with it")


def refuse_downgrade(store: Store, config: Config, where: str) -> None:
    """An unencrypted config next to key objects is a replaced config (the storage's doing, or a mistake):
    opening it would write plaintext into an encrypted repository. A remote one's cache remembers too."""
    if key_names(store):
        raise IntegrityError(f"{where} says the repository is unencrypted, but it has key objects (keys/): its config "
                             "was replaced; refusing to open it, which would store data unencrypted")


def blob_format(config: Config, master: MasterKeys) -> SealedFormat:
    return SealedFormat(Aead(config.encryption, master.encryption), master.id_key, config.padding)


def open_sealed_config(store: Store, sealed: SealedConfig, source: PasswordSource, where: str
                       ) -> tuple[Config, Unlocked]:
    """The full config of an encrypted repository (its chunker seeded by the key), and the keys."""
    unlocked = unlock(store, source.get())
    inner = Aead(sealed.encryption, unlocked.master.encryption).open(sealed.sealed, CONFIG_AD, f"{where}")
    config = Config.from_bytes(inner, where)
    if config.repo_id != sealed.repo_id or config.encryption != sealed.encryption:
        raise IntegrityError(f"{where}: the sealed config does not match the repository's id or encryption")
    return with_key_seed(config, unlocked.master), unlocked


def with_key_seed(config: Config, master: MasterKeys) -> Config:
    return replace(config, chunker=replace(config.chunker, seed=master.chunker_seed))


def seal_config(config: Config, master: MasterKeys) -> SealedConfig:
    return SealedConfig(config.repo_id, config.encryption,
                        Aead(config.encryption, master.encryption).seal(config.to_bytes(), CONFIG_AD))


def _key_info() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return {"host": socket.gethostname(), "user": user, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def add_key(store: Store, master: MasterKeys, aead: str, password: bytes) -> str:
    """Write (durably) a key object for ``password``; returns its name."""
    data = wrap_keys(master, aead, password, _key_info())
    name = KEYS_PREFIX + blake3.blake3(data).hexdigest()
    write_object(store, name, data)
    return name


def list_keys(store: Store, unlocked: Unlocked) -> list[KeyInfo]:
    out = []
    for name in key_names(store):
        try:
            info = _read_key(store, name).info(unlocked.master)
        except (IntegrityError, UnsupportedFormat) as exc:
            info = {"error": str(exc)}
        out.append(KeyInfo(name, name == unlocked.key_name, info))
    return out


def resolve_key(store: Store, ref: str) -> str:
    """The key object whose id starts with ``ref``."""
    ref = ref.removeprefix(KEYS_PREFIX)
    found = [n for n in key_names(store) if n.removeprefix(KEYS_PREFIX).startswith(ref)] if ref else []
    if not found:
        raise UsageError(f"no key {ref!r} in this repository (see 'dedupimg key list')")
    if len(found) > 1:
        raise UsageError(f"key id {ref!r} is ambiguous: give more digits")
    return found[0]


def remove_key(store: Store, name: str) -> None:
    """Delete a key object, never the last one."""
    names = key_names(store)
    if name not in names:
        raise UsageError(f"no key {name} in this repository")
    if len(names) == 1:
        raise UsageError("refusing to remove the only key: the repository could never be opened again")
    store.delete([name])
