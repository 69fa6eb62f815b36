"""Pack storage: the only code that creates, reads, lists or deletes the objects packs live in.

``base`` is the interface (:class:`~dedupimg.store.base.Store`), ``local`` a directory on a local disk (what
every repository uses today), ``memory`` a dict in this process (tests), ``s3`` a bucket on an S3-compatible
server (docs/storage.md). :func:`open_store` opens a store from its ``spec()``, in this or another process
(the read workers get a spec, never file paths).
"""

from __future__ import annotations

from dedupimg.core.errors import UsageError
from dedupimg.store.base import Store, StoreSpec


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


__all__ = ["Store", "StoreSpec", "open_store"]
