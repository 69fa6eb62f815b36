"""Encryption of a repository: master keys, the AEAD that seals every blob, keyed chunk ids, key objects.

An encrypted repository (docs/security.md) has random master keys: one for the AEAD (AES-256-GCM, or
ChaCha20-Poly1305 where the CPU lacks AES instructions), one for keyed blake3 chunk ids, and a 63-bit seed for
FastCDC's gear table. They live only in key objects, each wrapping them under a key derived from one password
with argon2id. Nothing here touches a store: callers pass bytes in and get bytes out.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack
from argon2.exceptions import HashingError as Argon2Error
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from dedupimg.core.errors import IntegrityError, UnsupportedFormat, UsageError

AES_GCM = "aes-256-gcm"
CHACHA = "chacha20-poly1305"
AEADS = (AES_GCM, CHACHA)
NONCE = 12  # random per sealed message: 96 bits, as both AEADs take
TAG = 16
OVERHEAD = NONCE + TAG
KEY_LEN = 32

# argon2id defaults: RFC 9106's second recommended memory (64 MiB) with twice its passes, 2 lanes: 0.14 s on
# this 2-core machine when quiet, up to ~0.45 s when busy. 128 MiB (t=3) took as long but doubled the fresh
# memory every command faults in at its start, which this VM backs slowly after a page cache drop.
# DEDUPIMG_ARGON2="t,m,p" overrides them for new keys (tests use tiny ones); the parameters are stored in each
# key object, so opening never depends on them.
ARGON2_TIME = 6
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_PARALLELISM = 2
KEY_OBJECT_VERSION = 1
SEED_LIMIT = 1 << 63  # FastCDC gear seeds are below this


def default_aead() -> str:
    """AES-256-GCM where the CPU has AES instructions (several GB/s per core), else ChaCha20-Poly1305."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return AES_GCM if " aes" in line else CHACHA
    except OSError:
        pass
    return AES_GCM


@dataclass(frozen=True)
class MasterKeys:
    """The repository's secrets. ``id_key`` empty: chunk ids are plain blake3 (a repository made with
    ``--copy-chunker-params-from`` an unencrypted one, to deduplicate against it)."""

    encryption: bytes
    id_key: bytes
    chunker_seed: int

    @classmethod
    def generate(cls) -> MasterKeys:
        # pyfastcdc shifts the seed left by one in a 64-bit integer: 63 bits of it are usable.
        return cls(secrets.token_bytes(KEY_LEN), secrets.token_bytes(KEY_LEN), 1 + secrets.randbelow(SEED_LIMIT - 1))

    def to_bytes(self) -> bytes:
        return msgpack.packb({"enc": self.encryption, "id": self.id_key, "cdc": self.chunker_seed},
                             use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> MasterKeys:
        try:
            doc = msgpack.unpackb(data, raw=False, max_map_len=8, max_array_len=8)
            enc, id_key, seed = doc["enc"], doc["id"], doc["cdc"]
            if not (isinstance(enc, bytes) and len(enc) == KEY_LEN and isinstance(id_key, bytes)
                    and len(id_key) in (0, KEY_LEN) and type(seed) is int and 0 <= seed < SEED_LIMIT):
                raise ValueError("bad key fields")
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            raise UnsupportedFormat("a key object holds damaged master keys") from None
        return cls(enc, id_key, seed)

    def with_hashing_of(self, other: MasterKeys | None) -> MasterKeys:
        """These keys, but ids and cut points as ``other`` makes them (None: an unencrypted repository's)."""
        if other is None:
            return MasterKeys(self.encryption, b"", 0)
        return MasterKeys(self.encryption, other.id_key, other.chunker_seed)


class Aead:
    """One AEAD key: :meth:`seal` gives nonce + ciphertext + tag; :meth:`open` checks and returns the plaintext.

    Thread-safe: the cryptography objects hold no per-call state."""

    def __init__(self, name: str, key: bytes) -> None:
        if name not in AEADS:
            raise UnsupportedFormat(f"unknown encryption {name!r} (this dedupimg knows {', '.join(AEADS)})")
        self.name = name
        self._key = key
        self._impl = AESGCM(key) if name == AES_GCM else ChaCha20Poly1305(key)

    def seal(self, plain: bytes | bytearray | memoryview, ad: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._impl.encrypt(nonce, plain, ad)

    def try_open(self, sealed: bytes | memoryview, ad: bytes) -> bytes | None:
        """The plaintext, or None when ``sealed`` does not authenticate (the hot path: no message built)."""
        if len(sealed) < OVERHEAD:
            return None
        view = memoryview(sealed)  # (the AEADs take buffers: no copy of the ciphertext)
        try:
            return self._impl.decrypt(view[:NONCE], view[NONCE:], ad)
        except InvalidTag:
            return None

    def peek(self, sealed: bytes | memoryview, length: int) -> bytes:
        """The first ``length`` bytes of ``sealed``'s plaintext, decrypted but NOT authenticated.

        Only ``repair index``'s salvage of a pack without its trailer uses it: a sealed blob's length, type and
        id are in no clear header, so the inner header is peeked to learn where the blob ends, and its data to
        compute the id to try. Nothing peeked is trusted: a blob counts only once :meth:`open` authenticates it
        with that id. Both AEADs encrypt with a stream cipher, so a prefix decrypts alone: AES-GCM is AES-CTR
        from counter block nonce|2 (NIST SP 800-38D, 96-bit nonce), ChaCha20-Poly1305 is ChaCha20 from block
        counter 1 (RFC 8439 §2.8; block 0 makes the Poly1305 key)."""
        view = memoryview(sealed)
        nonce = bytes(view[:NONCE])
        if len(nonce) != NONCE:
            return b""
        cipher: Cipher[Any] = (
            Cipher(algorithms.AES(self._key), modes.CTR(nonce + (2).to_bytes(4, "big"))) if self.name == AES_GCM
            else Cipher(algorithms.ChaCha20(self._key, (1).to_bytes(4, "little") + nonce), mode=None)
        )
        dec = cipher.decryptor()
        return dec.update(bytes(view[NONCE : NONCE + max(0, length)])) + dec.finalize()

    def open(self, sealed: bytes | memoryview, ad: bytes, what: str) -> bytes:
        """The plaintext, or IntegrityError naming ``what`` (altered, truncated, or sealed for another place)."""
        plain = self.try_open(sealed, ad)
        if plain is None:
            raise IntegrityError(f"{what} is truncated" if len(sealed) < OVERHEAD else
                                 f"{what} fails authentication (altered, or not the one it should be)")
        return plain


def chunk_hasher(id_key: bytes) -> Callable[..., Any]:
    """The function that names chunks: keyed blake3 with ``id_key``, plain blake3 without one."""
    if not id_key:
        return blake3.blake3
    return _keyed(id_key)


@functools.lru_cache(maxsize=8)
def _keyed(id_key: bytes) -> Callable[..., Any]:
    return functools.partial(blake3.blake3, key=id_key)  # (called per chunk: no Python frame of its own)


# -- key objects ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KdfParams:
    time_cost: int = ARGON2_TIME
    memory_kib: int = ARGON2_MEMORY_KIB
    parallelism: int = ARGON2_PARALLELISM

    @classmethod
    def default(cls) -> KdfParams:
        given = os.environ.get("DEDUPIMG_ARGON2")
        if not given:
            return cls()
        try:
            t, m, p = (int(v) for v in given.split(","))
            params = cls(t, m, p)
            params.check()
        except ValueError:
            raise UsageError(f"DEDUPIMG_ARGON2 must be TIME,MEMORY_KIB,PARALLELISM (e.g. 3,131072,2), got "
                             f"{given!r}") from None
        return params

    def check(self) -> None:
        # Bounded: a key object planted by the storage must not make opening take hours or all the memory.
        if not (1 <= self.time_cost <= 32 and 8 * self.parallelism <= self.memory_kib <= 1 << 22
                and 1 <= self.parallelism <= 16):
            raise ValueError("argon2 parameters out of range")

    def derive(self, password: bytes, salt: bytes) -> bytes:
        return hash_secret_raw(password, salt, self.time_cost, self.memory_kib, self.parallelism, KEY_LEN, Type.ID)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a string")
    return base64.b64decode(text.encode(), validate=True)


KEY_AD = b"dedupimg key v1"
KEY_INFO_AD = b"dedupimg key info v1"


def wrap_keys(master: MasterKeys, aead: str, password: bytes, info: dict[str, Any],
              params: KdfParams | None = None) -> bytes:
    """A key object: the master keys sealed under argon2id(password), and ``info`` (host, user, time) sealed
    under the master key, so that any key holder can list every key but the store learns nothing."""
    params = params or KdfParams.default()
    salt = secrets.token_bytes(16)
    kek = Aead(aead, params.derive(password, salt))
    doc = {
        "v": KEY_OBJECT_VERSION,
        "kdf": "argon2id",
        "time_cost": params.time_cost,
        "memory_kib": params.memory_kib,
        "parallelism": params.parallelism,
        "salt": b64(salt),
        "aead": aead,
        "keys": b64(kek.seal(master.to_bytes(), KEY_AD)),
        "info": b64(Aead(aead, master.encryption).seal(json.dumps(info, sort_keys=True).encode(), KEY_INFO_AD)),
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class KeyObject:
    params: KdfParams
    salt: bytes
    aead: str
    sealed_keys: bytes
    sealed_info: bytes

    @classmethod
    def parse(cls, data: bytes, where: str) -> KeyObject:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("v") != KEY_OBJECT_VERSION or doc.get("kdf") != "argon2id":
                raise ValueError("unknown key object version or KDF")
            params = KdfParams(*(_int(doc[k], k) for k in ("time_cost", "memory_kib", "parallelism")))
            params.check()
            aead = doc["aead"]
            if aead not in AEADS:
                raise ValueError(f"unknown AEAD {aead!r}")
            salt = unb64(doc["salt"], "salt")
            if not 8 <= len(salt) <= 64:  # argon2 refuses a shorter salt
                raise ValueError("salt length out of range")
            return cls(params, salt, aead, unb64(doc["keys"], "keys"), unb64(doc["info"], "info"))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise UnsupportedFormat(f"{where}: damaged key object ({' '.join(str(exc).split())})") from None

    def unwrap(self, password: bytes) -> MasterKeys | None:
        """The master keys, or None when ``password`` is not this key's."""
        try:
            kek = Aead(self.aead, self.params.derive(password, self.salt))
        except Argon2Error as exc:
            raise UnsupportedFormat(f"a key object's argon2 parameters are unusable ({exc})") from None
        try:
            return MasterKeys.from_bytes(kek.open(self.sealed_keys, KEY_AD, "key"))
        except IntegrityError:
            return None

    def info(self, master: MasterKeys) -> dict[str, Any]:
        """Host, user and creation time of this key (sealed under the master key)."""
        try:
            doc = json.loads(Aead(self.aead, master.encryption).open(self.sealed_info, KEY_INFO_AD, "key info"))
            return doc if isinstance(doc, dict) else {}
        except (IntegrityError, ValueError):
            return {}


def _int(value: Any, name: str) -> int:
    if type(value) is not int:
        raise ValueError(f"{name} is not an integer")
    return value
