"""``unlock``: remove the lock objects that commands killed or cut off from the store left behind.

A local repository's lock is a ``flock``, which dies with its process: there is never anything to remove. An
object store's lock is an object (docs/storage.md, "Locks"); one is stale when it was not refreshed for the
stale time, or when it names this host and a process that is gone. ``all_locks`` removes every lock object,
also those of commands still running elsewhere (restic's ``unlock --remove-all``): only for a lock known to
be left over.
"""

from __future__ import annotations

from pathlib import Path

from dedupimg.repo.repository import Repository


def unlock(location: Path | str, all_locks: bool = False) -> list[str]:
    """Remove stale lock objects (every one with ``all_locks``); returns what was removed, in words.

    Only the store is opened, after its config proves it a repository: no lock is taken (this is what removes
    them) and no index cache is read or synced."""
    _config, store, _where = Repository.config_file(location)  # a repository at all (exit 10 otherwise)
    try:
        return store.remove_locks(all_locks)
    finally:
        store.close()
