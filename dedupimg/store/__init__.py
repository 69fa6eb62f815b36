"""Pack storage: the only code that creates, reads, lists or deletes the objects packs live in.

``base`` is the interface (:class:`~dedupimg.store.base.Store`), ``local`` a directory on a local disk (what
every repository uses today), ``memory`` a dict in this process (tests), ``s3`` a bucket on an S3-compatible
server (docs/storage.md). :func:`open_store` opens a store from its ``spec()``, in this or another process
(the read workers get a spec, never file paths).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from dedupimg.core.errors import UsageError
from dedupimg.store.base import Store, StoreSpec

S3_SCHEME = "s3:"


def location_spec(location: str) -> StoreSpec:
    """The store a repository location names: ``s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]`` (restic's form;
    ``s3:HOST/BUCKET/PREFIX`` means https), anything else a local directory (made absolute)."""
    if not location.startswith(S3_SCHEME):
        return {"kind": "local", "root": os.path.abspath(location)}
    rest = location[len(S3_SCHEME):]
    if not rest.startswith(("http://", "https://")):
        rest = "https://" + rest
    expected = (f"repository {location!r}: expected s3:http://HOST:PORT/BUCKET/PREFIX (or s3:https://...) with "
                "a port from 1 to 65535")
    try:
        url = urlsplit(rest)
        port = url.port  # a bad one (":99999", ":abc") would reach object_store, which panics on it
        host = url.hostname
    except ValueError:  # also a bad IPv6 literal ("[::1", "[zz]")
        raise UsageError(expected) from None
    bucket, _, prefix = url.path.lstrip("/").partition("/")
    if not url.netloc or not host or port == 0 or not bucket or url.query or url.fragment:
        raise UsageError(expected)
    return {"kind": "s3", "endpoint": f"{url.scheme}://{url.netloc}", "bucket": bucket,
            "prefix": prefix.strip("/"), "region": ""}


def normalize_location(location: str) -> str:
    """``location`` as every process reads it the same way: a local directory made absolute."""
    spec = location_spec(location)
    return spec["root"] if spec["kind"] == "local" else location


def open_store(spec: StoreSpec) -> Store:
    """The store a ``spec()`` describes."""
    kind = spec.get("kind")
    if kind == "local":
        from dedupimg.store.local import LocalStore

        return LocalStore(spec["root"])
    if kind == "memory":
        from dedupimg.store.memory import MemoryStore

        return MemoryStore.from_spec(spec)
    if kind == "s3":
        from dedupimg.store.s3 import S3Store

        return S3Store.from_spec(spec)
    raise UsageError(f"unknown kind of store {kind!r}")


__all__ = ["Store", "StoreSpec", "location_spec", "normalize_location", "open_store"]
