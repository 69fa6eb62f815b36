"""The repository facade: open/init, chunk and segment storage, snapshot records.

Callers deal in chunk ids and bytes; pack files, offsets and the LMDB layout stay behind this class. It also
enforces the write ordering of docs/format.md: a pack is durable (fsynced and renamed, directory fsynced)
before the index transaction that points at it commits, and a snapshot record commits in the same
transaction as the last pack it needs.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from dedupimg.core import interrupts
from dedupimg.core.config import (
    DELTA_VERSION,
    ENCRYPTED_DELTA_VERSION,
    ENCRYPTED_VERSION,
    FORMAT_VERSION,
    ChunkerParams,
    Config,
    SealedConfig,
    parse_config_file,
)
from dedupimg.core.crypto import AEADS, MasterKeys
from dedupimg.core.envints import env_int
from dedupimg.core.errors import (
    AmbiguousSnapshot,
    DedupimgError,
    IntegrityError,
    NotARepository,
    PermissionDenied,
    RepositoryExists,
    RepositoryNotFound,
    SnapshotNotFound,
    UnusablePath,
    UsageError,
)
from dedupimg.core.fsutil import (
    DIR_MODE,
    atomic_write,
    fsync_dir,
    make_dirs,
    printable_utf8,
)
from dedupimg.core.manifest import Segment, SnapshotRecord, decode_segment, decode_tombstone, encode_tombstone
from dedupimg.core.parallel import worker_count
from dedupimg.core.password import REPOSITORY, PasswordSource
from dedupimg.core.progress import Progress
from dedupimg.repo import audit as audit_mod
from dedupimg.repo import compaction, create, indexobjects, keys, pack, readpool
from dedupimg.repo.index import DATA_FILE, BlobLocation, Index, NewSegment, NewSnapshot, SealedPack, SyncReport
from dedupimg.repo.pack import EncodedBlob
from dedupimg.repo.readpool import Landed, ReadPool
from dedupimg.store import Store, location_spec, open_store
from dedupimg.store.lock import LockMode

if TYPE_CHECKING:
    from dedupimg.repo import repair as repair_mod
from dedupimg.store.base import ObjectMissing, ObjectReader, StoreError, StoreLock
from dedupimg.store.local import LocalStore

CONFIG = "config"
PACKS = "packs"
TMP = "tmp"
INDEX = "index"
CACHE_ENV = "DEDUPIMG_CACHE_DIR"
ENCRYPTED_MARKER = "encrypted"  # in a remote repository's cache directory
ENCRYPTED_LOCATIONS = "encrypted-locations"  # in the cache root: a file per encrypted remote location
OPEN_PACKS = 64
MAX_READ = 16 << 20  # largest single pread of adjacent blobs
# An object store: reads in flight at once (restore), and per read worker (mount, serve).
REMOTE_READS = env_int("DEDUPIMG_REMOTE_READS", 6, 1, 64)  # (an override for measurements)
REMOTE_READS_PER_WORKER = env_int("DEDUPIMG_REMOTE_READS_PER_WORKER", 4, 1, 64)
REMOTE_GAP = 512 << 10  # bytes of other blobs one request may read over rather than make two (object stores)
# Packs of a remote repository uploading at once while the next fills, each up to 32 MiB in memory: 3 were no
# faster than 2 here and took 37 MB more (first snapshot of 1 GiB on loopback SeaweedFS: 257 vs 294 MB peak).
UPLOADS_AHEAD = env_int("DEDUPIMG_UPLOADS_AHEAD", 2, 0, 16)
POOL_RUN = 1 << 20  # a read worker's unit of work: a read-ahead window spreads over the workers
# A changed chunk is stored as a delta on its base only when that takes at most this share of its stored bytes
# alone: reading a delta costs a second blob (its base) at restore, which a small saving does not pay for.
DELTA_MAX_SHARE = 0.5
DELTA_SURE = 16  # a delta at most 1/16 of the raw chunk is kept without compressing the chunk alone (CPU)
# Deltas need their base read back while a snapshot runs: a local pread, but in an object store a request per
# run of bases (a scattered nightly's bases lie all over the parent's packs): downloading about what the upload
# saves. So object stores get whole chunks unless this is 1 (tests, measurements); they read deltas either way.
REMOTE_DELTAS = env_int("DEDUPIMG_REMOTE_DELTAS", 0, 0, 1)


def store_for(path: Path) -> Store:
    """The store that holds the packs of the repository at ``path``: its own directory (packs/, tmp/)."""
    return LocalStore(path)


def default_cache_root() -> Path:
    """Where remote repositories' caches live unless told: ``$XDG_CACHE_HOME/dedupimg`` (~/.cache/dedupimg)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dedupimg"


def cache_home(cache_dir: Path | str | None, repo_id: str) -> Path:
    """A remote repository's cache directory, ``<cache root>/<repo id>/`` (made, mode 0700)."""
    home = Path(cache_dir or os.environ.get(CACHE_ENV) or default_cache_root()) / repo_id
    try:
        make_dirs(home)
        if not home.is_dir():  # a dangling symlink: make_dirs took its FileExistsError for a directory
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(home))
        # Written at every open (the index, the markers): a read-only filesystem fails here, not halfway.
        if not os.access(home, os.W_OK):
            code = errno.EROFS if os.statvfs(home).f_flag & os.ST_RDONLY else errno.EACCES
            raise OSError(code, os.strerror(code), str(home))
    except PermissionError:
        raise PermissionDenied(f"cannot create the cache directory {home}: permission denied") from None
    except OSError as exc:  # a read-only filesystem, a file where a directory belongs, ...
        raise UnusablePath(f"cannot use the cache directory {home}: {exc.strerror} (set --cache-dir or "
                           f"{CACHE_ENV} to a writable directory)") from None
    return home


def _build_local(path: Path, config: Config, master: MasterKeys | None, secret: bytes) -> keys.Unlocked | None:
    """The files of a new repository in the existing, empty directory ``path``; the config is written last."""
    # tmp/, packs/ and packs/00 ... packs/ff; the 256 entries are made durable by one fsync of packs/.
    store = LocalStore(path)
    store.initialize(pack.pack_levels() + ([keys.KEYS_PREFIX.rstrip("/")] if master is not None else []))
    os.mkdir(path / INDEX, DIR_MODE)
    Index(path / INDEX, create=True).close()
    unlocked = None
    if master is not None:
        unlocked = keys.Unlocked(master, keys.add_key(store, master, config.encryption, secret), config.encryption)
    # The config is written last: a directory without it is not (yet) a repository.
    fsync_dir(path)
    atomic_write(path / CONFIG, _config_file(config, master))
    return unlocked


def _is_repository(path: Path) -> bool:
    """Whether ``path`` looks like a repository: a config file beside a packs directory."""
    try:
        return (path / CONFIG).is_file() and (path / PACKS).is_dir()
    except OSError:
        return False


def _enclosing_repository(path: Path) -> Path | None:
    """The repository that ``path`` (followed through symlinks) would lie inside, if any."""
    for parent in Path(path).resolve().parents:
        if _is_repository(parent):
            return parent
    return None


@dataclass
class _Run:
    """Blobs that lie back to back in one pack: ``blobs`` (offset, id, type, stored length) within
    [start, start+length)."""

    pack_no: int
    start: int
    length: int
    blobs: list[pack.RunBlob]
    raw: int = 0  # raw bytes of its blobs
    deltas: list[bytes] = field(default_factory=list)  # the ids of its DELTA chunks (their bases are read too)


def _deltas(runs: list[_Run]) -> list[bytes]:
    """The ids of the DELTA chunks in ``runs`` (their bases are read with them)."""
    return [d for run in runs for d in run.deltas]


@dataclass(frozen=True)
class RepoStats:
    snapshots: int
    logical_bytes: int
    unique_bytes: int  # raw bytes of distinct chunks
    chunk_stored_bytes: int  # those chunks as stored (compressed)
    pack_bytes: int
    packs: int
    chunks: int


@dataclass(frozen=True)
class BlobUsage:
    """What a blob costs and who needs it, without its place: raw length, bytes it takes in its pack (header
    included) and its reference count (a chunk: stored segments listing it; a segment: live records)."""

    raw_len: int
    stored_len: int
    refcount: int


class Repository:
    """A repository: its config, its store (packs) and its index.

    Local (a directory): ``path`` is the repository, its index ``path/index``. Remote (an object store,
    ``remote=True``): the store holds the config, packs and index objects (repo/indexobjects.py); ``path``
    is this host's cache directory, whose ``index/`` is rebuilt from the index objects whenever it is missing,
    damaged or behind (:meth:`sync`).
    """

    def __init__(self, path: Path, config: Config, store: Store | None = None, owns_store: bool = False,
                 remote: bool = False, unlocked: keys.Unlocked | None = None) -> None:
        self.path = path
        self.config = config
        self.remote = remote
        # How blobs are laid out: plain (version 1), or sealed with the master keys (version 2).
        self.unlocked = unlocked
        self.blobs: pack.BlobFormat = pack.PLAIN if unlocked is None else keys.blob_format(config, unlocked.master)
        # The id a chunk of these bytes has here: blake3, keyed in an encrypted repository (the format's own
        # function, taken per chunk by snapshot and delta restore).
        self.chunk_id: Callable[[bytes | bytearray | memoryview], bytes] = self.blobs.chunk_id
        self.store: Store = store_for(path) if store is None else store  # every pack is read and written here
        self._owns_store = store is None or owns_store  # a store given by the caller is the caller's to close
        # Where users find the repository: the directory, or the store's URL (s3:http://host/bucket/prefix).
        self.location = self.store.location("").rstrip("/") if remote else str(path)
        try:
            self.index = _open_cache(path) if remote else Index(path / INDEX)
        except PermissionError as exc:  # index/ itself unreadable (lmdb's own refusals: index._translate)
            where = exc.filename or path / INDEX
            raise PermissionDenied(f"cannot open the index at {where}: permission denied") from None
        self._packs = _OpenPacks(self)
        self._lock: StoreLock | None = None
        self._pool: ReadPool | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        location: Path | str,
        chunker: ChunkerParams | None = None,
        pack_size: int | None = None,
        compression_level: int | None = None,
        cache_dir: Path | str | None = None,
        encryption: str = "none",
        password: PasswordSource = REPOSITORY,
        hashing_of: MasterKeys | None = None,
        copied_params: bool = False,
        padding: int | None = None,
        deltas: bool = True,
    ) -> Repository:
        """Create a repository at ``location``: a local directory, or ``s3:...`` (store/__init__.py).

        ``encryption`` an AEAD of core/crypto.py: an encrypted repository, with a key for the password of
        ``password`` (asked twice on a terminal). ``copied_params``: ``chunker`` is another repository's, whose
        master keys are ``hashing_of`` (None: it is unencrypted): chunk ids and cut points as there.
        ``deltas`` False makes a repository of the formats before deltas (1 or 2), for older dedupimg."""
        spec = location_spec(str(location))
        config = Config(chunker=chunker or ChunkerParams(), version=DELTA_VERSION if deltas else FORMAT_VERSION)
        master: MasterKeys | None = None
        if encryption != "none":
            if encryption not in AEADS:
                raise UsageError(f"unknown encryption {encryption!r}: use one of {', '.join(AEADS)} or none")
            config = replace(config, version=ENCRYPTED_DELTA_VERSION if deltas else ENCRYPTED_VERSION,
                             encryption=encryption)
            if padding is not None:
                config = replace(config, padding=padding)
            master = MasterKeys.generate()
            if copied_params:  # from another repository: cut and name chunks as it does
                master = master.with_hashing_of(hashing_of)
            config = keys.with_key_seed(config, master)
        if pack_size:
            config = replace(config, pack_size=pack_size)
        if compression_level is not None:
            if not -7 <= compression_level <= 22:
                raise UsageError(f"compression level must be from -7 to 22, got {compression_level}")
            config = replace(config, compression_level=compression_level)
        secret = password.get("new repository", confirm=True) if master is not None else b""
        if spec["kind"] != "local":
            return cls._init_remote(open_store(spec), config, cache_dir, master, secret)
        path = Path(spec["root"])
        if not printable_utf8(str(path)):
            # LMDB takes its path as UTF-8 text: found by review, such a path failed after the directories
            # were made, and the half-made repository then refused a second init.
            raise UsageError(f"repository path {str(path)!r} is not printable UTF-8: choose another path")
        outer = _enclosing_repository(path)
        if outer is not None:
            raise RepositoryExists(f"{path} is inside the dedupimg repository {outer}; refusing to create a "
                                   f"repository there")
        if path.exists():
            if not path.is_dir():
                raise RepositoryExists(f"{path} exists and is not a directory")
            if _is_repository(path):
                raise RepositoryExists(f"{path} is a dedupimg repository already")
            unlocked = create.in_place(path, {TMP, PACKS, INDEX, keys.KEYS_PREFIX.rstrip("/")},
                                       lambda at: _build_local(at, config, master, secret))
        elif path.is_symlink():
            raise RepositoryExists(f"{path} is a symbolic link to nothing; refusing to create a repository there")
        else:
            unlocked = create.beside(path, lambda at: _build_local(at, config, master, secret))
        return cls(path, config, unlocked=unlocked)

    @classmethod
    def _init_remote(cls, store: Store, config: Config, cache_dir: Path | str | None,
                     master: MasterKeys | None = None, secret: bytes = b"") -> Repository:
        """A new repository in an object store: the bucket made if missing, the config object written last."""
        try:
            make_bucket = getattr(store, "create_bucket", None)
            if make_bucket is not None:
                make_bucket()
            top = store.list("")
            if any(o.name == CONFIG for o in top.objects):
                raise RepositoryExists(f"{store.location('').rstrip('/')} is a dedupimg repository already")
            if top.objects or top.dirs:
                raise RepositoryExists(f"{store.location('').rstrip('/')} is not empty; refusing to create a "
                                       "repository there")
            home = cache_home(cache_dir, config.repo_id)
            Index(_fresh_cache(home), create=True).close()
            unlocked = None
            if master is not None:
                name = keys.add_key(store, master, config.encryption, secret)
                unlocked = keys.Unlocked(master, name, config.encryption)
            writer = store.create()
            try:
                writer.write(_config_file(config, master))
                writer.commit(CONFIG)
            except BaseException:
                writer.abort()
                raise
            return cls(home, config, store, owns_store=True, remote=True, unlocked=unlocked)
        except BaseException:
            store.close()
            raise

    @classmethod
    def open(cls, location: Path | str, lock: LockMode | None = None, lock_wait: float = 0.0, purpose: str = "",
             cache_dir: Path | str | None = None, password: PasswordSource = REPOSITORY) -> Repository:
        """Open a repository; with ``lock``, hold the store's repository lock (local: a flock on REPO/lock)
        until :meth:`close`.

        snapshot, restore, mount and serve take a SHARED lock, forget and prune an EXCLUSIVE one; a conflicting
        holder is waited for up to ``lock_wait`` seconds (RepositoryLocked then). ``purpose`` names the command
        in lock messages. A remote repository's cache (``cache_dir``, $DEDUPIMG_CACHE_DIR or
        :func:`default_cache_root`) is brought up to date with the store once the lock is held. An encrypted
        repository takes the password of ``password`` (WrongPassword, exit 22, when it opens no key).
        """
        spec = location_spec(str(location))
        remote = spec["kind"] != "local"
        if remote:
            store = open_store(spec)
            path = Path()
        else:
            path = Path(spec["root"])
            store = None
        try:
            config, unlocked, store = cls.read_config_and_keys(location, password, store)
        except BaseException:
            if store is not None:
                store.close()
            raise
        held = store.lock(lock, lock_wait, purpose) if lock is not None else None
        try:
            if held is not None:
                held.acquire()
            if remote:
                path = cache_home(cache_dir, config.repo_id)
                _remember_encryption(path, config, store.location(""))
            repo = cls(path, config, store, owns_store=True, remote=remote, unlocked=unlocked)
            if remote:
                try:
                    repo.sync()
                except BaseException:
                    repo._owns_store = False
                    repo.close()
                    raise
        except BaseException:
            if held is not None:
                held.release()
            store.close()
            raise
        repo._lock = held
        return repo

    @staticmethod
    def read_config_and_keys(location: Path | str, password: PasswordSource = REPOSITORY, store: Store | None = None
                             ) -> tuple[Config, keys.Unlocked | None, Store]:
        """The config of the repository at ``location`` (its store: ``store``, or one opened here), and for an
        encrypted one the master keys the password opens. Neither index nor lock is touched (repair and
        ``init --copy-chunker-params-from`` use it)."""
        parsed, store, where = Repository.config_file(location, store)
        try:
            if isinstance(parsed, Config):
                keys.refuse_downgrade(store, parsed, where)
                return parsed, None, store
            config, unlocked = keys.open_sealed_config(store, parsed, password, where)
        except BaseException:
            store.close()
            raise
        return config, unlocked, store

    @staticmethod
    def config_file(location: Path | str, store: Store | None = None) -> tuple[Config | SealedConfig, Store, str]:
        """The config file of the repository at ``location`` as it stands (no password asked: an encrypted
        one's shows only its id and cipher), its store (``store``, or one opened here; closed on an error) and
        where the file is, for messages."""
        spec = location_spec(str(location))
        if spec["kind"] == "local":
            path = Path(spec["root"])
            parsed: Config | SealedConfig = Repository.read_config_file(path)
            return parsed, store if store is not None else store_for(path), str(path / CONFIG)
        store = store if store is not None else open_store(spec)
        try:
            return read_remote_config(store), store, store.location(CONFIG)
        except BaseException:
            store.close()
            raise

    @staticmethod
    def read_config(path: Path) -> Config:
        """The config of an unencrypted local repository, checked; the index is not opened."""
        parsed = Repository.read_config_file(path)
        if isinstance(parsed, SealedConfig):
            raise UsageError(f"{path} is encrypted: open it with its password")
        return parsed

    @staticmethod
    def read_config_file(path: Path) -> Config | SealedConfig:
        """The repository's config file, checked; the index is not opened (repair works without it)."""
        try:
            if not path.exists():
                raise RepositoryNotFound(f"repository {path} does not exist")
            if not path.is_dir() or not (path / CONFIG).is_file():
                raise NotARepository(f"{path} is not a dedupimg repository (no config file)")
            raw = (path / CONFIG).read_bytes()
        except PermissionError:
            raise PermissionDenied(f"cannot read repository {path}: permission denied") from None
        except OSError as exc:
            raise NotARepository(f"cannot read {path / CONFIG}: {exc.strerror}") from None
        return parse_config_file(raw, str(path / CONFIG))

    def sync(self) -> SyncReport:
        """Bring a remote repository's cache up to date with the index objects in the store: add new ones;
        rebuild it from all of them when some it holds are gone (a prune or repair rewrote them).

        Called by :meth:`open` before anything is read. A rebuild keeps every pack's number and never gives a
        gone pack's number to another, so other processes of this host that hold pack numbers meanwhile (a
        mount's open pack handles, a read pool's runs) never read one pack for another."""
        if not self.remote:
            return SyncReport()
        have = set(self.index.index_objects())
        present = indexobjects.names(self.store)
        if not have - present:  # nothing gone: add what is new, if anything
            if present == have:
                return SyncReport()
            report = self.index.sync(indexobjects.fetch(self.store, present - have, self.blobs))
            if not report.left_out:
                return report
            # A new record names a segment (or a segment a chunk) that this cache has no row for, while the
            # index objects list it: this host's prune dropped the rows of dead blobs in packs it kept, and
            # another host, whose cache was rebuilt from the objects, reused them. Rebuilding this cache from
            # the objects brings those rows back, so the record is listed and its data is never pruned.
        return self.index.sync(indexobjects.fetch(self.store, present, self.blobs), replace=True)

    def check_lock(self) -> None:
        """RepositoryLocked unless the lock this repository was opened with is still held (an object store's
        lock can be lost: removed by ``unlock --remove-all``, or not refreshed in time); before deleting, and
        before a snapshot record is listed."""
        if self._lock is not None:
            self._lock.check()

    def unlist_packs(self, pack_ids: list[bytes]) -> None:
        """Before packs are deleted (prune): rewrite the index objects that list them without them, so that no
        index object in the store names a pack that is gone (remote repositories; local: nothing to do)."""
        if not self.remote or not pack_ids:
            return
        gone = set(pack_ids)
        affected = [n for n, ids in self.index.index_objects().items() if gone.intersection(ids)]
        added: dict[str, list[bytes]] = {}
        for listings in indexobjects.fetch(self.store, affected, self.blobs).values():
            keep = [ls for ls in listings if ls.sealed.id not in gone]
            if keep:
                name = indexobjects.publish(self.store, [(ls.sealed, {i: (pack.RAW, raw) for i, raw in
                                                                      ls.metadata.items()}) for ls in keep],
                                            self.blobs)
                added[name] = [ls.sealed.id for ls in keep]
        # The replacements are durable first; then the store drops the old objects, and only then this cache
        # records the change: killed before that, the cache still names an object that is gone, so its next
        # sync rebuilds it from the objects; never does a surviving old object look new to it (an incremental
        # sync of one would bring back rows this prune dropped).
        self.store.delete(affected)
        self.index.replace_objects(affected, added)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._packs.close()
        self.index.close()
        if self._lock is not None:  # released while the store is still open (an object store's lock lives there)
            self._lock.release()
            self._lock = None
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------------------

    def read_blobs(self, ids: list[bytes]) -> list[bytes]:
        """Raw bytes of each blob, verified against its id; raises IntegrityError on any damage.

        Blobs that lie back to back in one pack (chunks stored in image order usually do) are read with
        one pread, up to MAX_READ bytes.
        """
        return self._read_ids(ids, resolve_deltas=True)

    def _read_ids(self, ids: list[bytes], resolve_deltas: bool) -> list[bytes]:
        runs = self._runs(ids, MAX_READ)
        bases = self._bases(_deltas(runs)) if resolve_deltas else None
        if not self.remote:
            return [raw for run in runs for raw in self._read_run(run, bases)]
        found: dict[bytes, bytes] = {}  # runs grouped by pack (below): put back in the order asked
        for run in runs:
            found.update(zip((b[1] for b in run.blobs), self._read_run(run, bases), strict=True))
        return [found[i] for i in ids]

    def _read_run(self, run: _Run, bases: pack.Bases | None = None) -> list[bytes]:
        with self._packs.use(run.pack_no) as reader:
            return pack.read_blob_run(reader, run.start, run.length, run.blobs, f"pack #{run.pack_no}", self.blobs,
                                      bases)

    def _links(self, deltas: list[bytes]) -> list[tuple[bytes, bytes]]:
        """(delta id, base id) of each DELTA chunk in ``deltas``."""
        if not deltas:
            return []
        links = []
        for delta, base in zip(deltas, self.index.delta_bases(deltas), strict=True):
            if base is None:
                raise IntegrityError(f"chunk {delta.hex()[:16]} is a delta whose base the index does not name; "
                                     "run 'dedupimg repair index'")
            links.append((delta, base))
        return links

    def delta_base_raws(self, delta_ids: list[bytes]) -> dict[bytes, bytes]:
        """The raw bytes of each delta chunk's base, by delta id (check --read-data, prune's rewrite)."""
        return self._bases(delta_ids) or {}

    def _bases(self, deltas: list[bytes]) -> dict[bytes, bytes] | None:
        """The raw bytes of the bases of the DELTA chunks ``deltas``, by delta id (None: there is none).
        Bases are never deltas themselves (the index refuses such a link): they are read without bases, so a
        damaged index that named a delta as a base fails here instead of recursing."""
        links = self._links(deltas)
        if not links:
            return None
        base_ids = list(dict.fromkeys(b for _d, b in links))
        raws = dict(zip(base_ids, self._read_ids(base_ids, resolve_deltas=False), strict=True))
        return {delta: raws[base] for delta, base in links}

    # -- reading for servers: a pool of worker processes (readpool.py says why) --------------------------------

    def start_read_pool(self, workers: int = readpool.WORKERS, cache_bytes: int = readpool.CACHE_BYTES) -> None:
        """From now on :meth:`fetch_blobs` reads in ``workers`` processes, into a shared cache of about
        ``cache_bytes``. Runs must fit a slot, so a slot holds at least the largest chunk."""
        if self._pool is None and workers > 0 and hasattr(os, "memfd_create") and self.store.cross_process:
            slot = max(POOL_RUN, self.config.chunker.max_size)  # (not Linux, or an in-memory store: read here)
            try:
                self._pool = ReadPool(workers, slot, max(16, cache_bytes // slot), self.store.spec(),
                                      threads=REMOTE_READS_PER_WORKER if self.remote else 1,
                                      blob_format=self.blob_format_doc())
            except OSError:
                pass  # workers cannot be started (the interpreter not executable by this user): read here

    def blob_format_doc(self) -> dict[str, object] | None:
        """What a read worker process needs to read this repository's blobs (None: plain). It holds the
        master keys: it goes to the worker through its pipe, never on a command line or in the environment."""
        if self.unlocked is None:
            return None
        master = self.unlocked.master
        return {"aead": self.config.encryption, "enc": master.encryption, "id": master.id_key,
                "padding": self.config.padding}

    @property
    def concurrent_reads(self) -> int:
        """How many reads of packs are worth having in flight at once: an object store answers each after a
        round trip, so many; a local disk, about one per core."""
        return REMOTE_READS if self.remote else worker_count()

    @property
    def parallel_reads(self) -> bool:
        return self._pool is not None

    @property
    def read_pool(self) -> ReadPool | None:
        """The read pool, once started: a chunk source (chunksource.py) pins the slots it copies from there."""
        return self._pool

    def fetch_blobs(self, ids: list[bytes]) -> list[tuple[list[bytes], Future[Landed]]]:
        """Start reading ``ids``: ``(some ids, future of their verified bytes)`` per run of adjacent blobs.

        With a read pool the runs are read by its workers while the caller goes on, and land in its shared
        cache (pin them in the pool before using the bytes); without one they are read here, and the futures are
        done on return. A blob missing from the index raises IntegrityError here; damage inside a run is the
        exception of its future.
        """
        pool = self._pool
        if pool is None:
            return [([b[1] for b in run.blobs], self._read_here([run])) for run in self._runs(ids, MAX_READ)]
        out: list[tuple[list[bytes], Future[Landed]]] = []
        for bundle in self._bundles(self._runs(ids, POOL_RUN, pool.slot_bytes), pool.slot_bytes):
            links = self._links(_deltas(bundle))
            base_runs = self._runs(list(dict.fromkeys(b for _d, b in links)), POOL_RUN) if links else []
            future = pool.submit([self._pack_run(run) for run in bundle], [self._pack_run(r) for r in base_runs],
                                 links)
            if future is None:  # no worker left in the pool: read here
                future = self._read_here(bundle)
            out.append(([b[1] for run in bundle for b in run.blobs], future))
        return out

    def _pack_run(self, run: _Run) -> readpool.PackRun:
        """``run`` as a read worker takes it: the pack by name, and named in messages by its file, as here."""
        pack_id = self.index.pack_id(run.pack_no)
        return readpool.PackRun(pack.pack_name(pack_id), run.start, run.length, run.blobs,
                                f"pack {pack.pack_file_name(pack_id)}")

    def _bundles(self, runs: list[_Run], slot_bytes: int) -> Iterator[list[_Run]]:
        """Consecutive ``runs`` grouped to fill read pool slots of ``slot_bytes`` raw bytes. An object store's
        runs stay one per slot: each is a request, and a worker's threads take slots, not runs, in parallel."""
        bundle: list[_Run] = []
        raw = 0
        for run in runs:
            if bundle and (self.remote or raw + run.raw > slot_bytes):
                yield bundle
                bundle, raw = [], 0
            bundle.append(run)
            raw += run.raw
        if bundle:
            yield bundle

    def _read_here(self, runs: list[_Run]) -> Future[Landed]:
        """A done future of the blobs of ``runs``, read in this thread (or of the damage found)."""
        future: Future[Landed] = Future()
        try:
            bases = self._bases(_deltas(runs))
            future.set_result(Landed(None, 0, [raw for run in runs for raw in self._read_run(run, bases)]))
        except IntegrityError as exc:
            future.set_exception(exc)
        return future

    def _runs(self, ids: list[bytes], max_run: int, max_raw: int | None = None) -> list[_Run]:
        """``ids`` grouped into runs of blobs that lie back to back in one pack, in order, each at most
        ``max_run`` bytes long (and holding at most ``max_raw`` raw bytes, or one blob); IntegrityError for an
        id the index does not have.

        In an object store every run is a request, which costs far more than the bytes around it: there the
        blobs are grouped by pack, sorted by offset, once each, and a run may jump over up to REMOTE_GAP
        bytes of other blobs (a later version's chunks lie between its parent's, so image order alternates
        between packs and would make a request of every few chunks)."""
        found = self.index.lookup_blobs(ids)
        if None in found:
            missing = ids[found.index(None)]
            raise IntegrityError(f"blob {missing.hex()[:16]} is not in the index")
        locations: list[tuple[bytes, BlobLocation]] = list(zip(ids, found, strict=True))  # type: ignore[arg-type]
        gap = 0
        if self.remote:
            by_pack: dict[int, dict[bytes, BlobLocation]] = {}
            for id_, loc in locations:
                by_pack.setdefault(loc.pack_no, {})[id_] = loc
            locations = [(i, loc) for blobs in by_pack.values()
                         for i, loc in sorted(blobs.items(), key=lambda kv: kv[1].offset)]
            gap = REMOTE_GAP
        runs: list[_Run] = []
        run: _Run | None = None
        for id_, loc in locations:
            end = loc.offset + pack.blob_span(loc.stored_len)
            if run is None or loc.pack_no != run.pack_no or not 0 <= loc.offset - (run.start + run.length) <= gap \
                    or end - run.start > max_run or (max_raw is not None and run.raw + loc.raw_len > max_raw):
                run = _Run(loc.pack_no, loc.offset, 0, [])
                runs.append(run)
            run.blobs.append((loc.offset, id_, loc.type, loc.stored_len))
            run.length = end - run.start
            run.raw += loc.raw_len
            if loc.codec == pack.DELTA:
                run.deltas.append(id_)
        return runs

    @property
    def writes_deltas(self) -> bool:
        """Whether new chunks may be stored as deltas here (format 3 or 4, and a local store: REMOTE_DELTAS)."""
        return self.config.deltas and (not self.remote or bool(REMOTE_DELTAS))

    def delta_bases(self, ids: list[bytes]) -> list[bytes | None]:
        """The base chunk of each id stored as a delta (format 3), None for every other id."""
        return self.index.delta_bases(ids)

    def dead_delta_links(self) -> Counter[bytes]:
        """How many links each base holds from delta chunks whose reference count is 0 already (an interrupted
        snapshot's): the next prune drops those deltas and, with them, their references of the base (§11)."""
        deltas = [i for i, loc in self.index.dead_rows()
                  if loc is not None and loc.type == pack.CHUNK and loc.codec == pack.DELTA]
        return Counter(b for b in self.index.delta_bases(deltas) if b is not None)

    def segment(self, seg_id: bytes) -> Segment:
        raw = self.index.get_segment(seg_id)
        if raw is None:
            raise IntegrityError(f"manifest segment {seg_id.hex()[:16]} is not in the index")
        # The index's copy is checked against its id, like every blob read from a pack: an altered copy that
        # kept its total length would otherwise map the image wrongly for every reader (issue 11 §1c).
        if pack.blob_id(raw) != seg_id:
            raise IntegrityError(f"the index's copy of manifest segment {seg_id.hex()[:16]} does not match its id; "
                                 "run 'dedupimg repair index'")
        return decode_segment(bytes(raw))

    def snapshots(self, name: str | None = None) -> list[SnapshotRecord]:
        records = [SnapshotRecord.decode(bytes(raw)) for _, raw in self.index.snapshots()]
        if name is not None:
            records = [r for r in records if r.name == name]
        return sorted(records, key=lambda r: (r.datetime, r.hex_id))

    def resolve(self, ref: str, name: str | None = None) -> SnapshotRecord:
        """A snapshot by full id, unique id prefix, ``latest`` or ``NAME@latest``."""
        if ref.endswith("@latest"):
            name, ref = ref[: -len("@latest")], "latest"
        records = self.snapshots(name)
        if ref == "latest":
            if not records:
                which = f" named {name!r}" if name else ""
                raise SnapshotNotFound(f"no snapshot{which} in the repository")
            names = sorted({r.name for r in records})
            if len(names) > 1:  # the newest of any image would restore (or serve) another machine's disk
                listed = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
                raise AmbiguousSnapshot(
                    f"'latest' is ambiguous: the repository holds {len(names)} image names ({listed}); "
                    "give --name NAME or NAME@latest"
                )
            return records[-1]
        ref_l = ref.lower()
        matches = [r for r in records if r.hex_id.startswith(ref_l)] if ref_l else []
        if not matches:
            raise SnapshotNotFound(f"no snapshot matches {ref!r}")
        if len(matches) > 1:
            raise AmbiguousSnapshot(
                f"snapshot prefix {ref!r} is ambiguous: it matches {len(matches)} snapshots; give more digits"
            )
        return matches[0]

    def stats(self) -> RepoStats:
        unique = stored = chunks = 0
        for _, loc in self.index.iter_blob_rows():
            if loc.type == pack.CHUNK:
                chunks += 1
                unique += loc.raw_len
                stored += loc.stored_len
        packs = self.index.pack_rows()
        records = self.snapshots()
        return RepoStats(
            snapshots=len(records),
            logical_bytes=sum(r.size for r in records),
            unique_bytes=unique,
            chunk_stored_bytes=stored,
            pack_bytes=sum(row.size for row in packs),
            packs=len(packs),
            chunks=chunks,
        )

    def blob_usage(self, ids: list[bytes]) -> list[BlobUsage | None]:
        """For each id, its lengths and reference count from the index (None: not indexed); reads no pack."""
        return [None if loc is None else BlobUsage(loc.raw_len, pack.blob_span(loc.stored_len), loc.refcount)
                for loc in self.index.lookup_blobs(ids)]

    def replace_records(self, pairs: list[tuple[SnapshotRecord, SnapshotRecord]]) -> None:
        """Replace each listed ``old`` record by its ``new`` one (``tag``): one pack holding the new records and
        a tombstone naming the old ones is made durable, then one index transaction lists the new records and
        drops the old ones. Killed before that transaction, the old records stay listed (the pack is an
        orphan, which ``repair index`` would read as the replacement done); after it, the new ones: never
        neither, never both. New records must differ from every record ever stored (their ids are new)."""
        if not pairs:
            return
        new_ids = [new.id for _, new in pairs]
        if any(self.index.has_blobs(new_ids)) or any(self.index.forgotten(new_ids)):
            raise UsageError("a replacement record is identical to one stored before")
        writer = self.new_pack()
        listed = []
        for _old, new in pairs:
            raw = new.encode()
            writer.add(pack.SNAPSHOT, new.id, pack.RAW, raw, len(raw))
            listed.append(NewSnapshot(new.id, raw, [sid for sid, _ in new.segments]))
        tomb = encode_tombstone([old.id for old, _ in pairs])
        writer.add(pack.TOMBSTONE, pack.blob_id(tomb), pack.RAW, tomb, len(tomb))
        sealed = self.seal(writer)
        forgotten = [NewSnapshot(old.id, b"", [sid for sid, _ in old.segments]) for old, _ in pairs]
        try:
            self.index.replace_snapshots(sealed, listed, forgotten)
        except BaseException:
            self.discard_unlisted(sealed)
            raise

    def forget(self, records: list[SnapshotRecord]) -> None:
        """Drop snapshot records (their data stays until a prune collects it).

        A tombstone naming them is written to a new pack and made durable first, so that ``repair index``,
        which rebuilds the index from packs, never brings them back; then one index transaction registers
        that pack and drops the records (docs/format.md §8.4).
        """
        if not records:
            return
        raw = encode_tombstone([r.id for r in records])
        writer = self.new_pack()
        writer.add(pack.TOMBSTONE, pack.blob_id(raw), pack.RAW, raw, len(raw))
        forgotten = [NewSnapshot(r.id, b"", [sid for sid, _ in r.segments]) for r in records]
        self.index.forget(self.seal(writer), forgotten)

    def new_pack(self) -> pack.PackWriter:
        """A pack being written, in a new object of the store (a temp file in ``tmp/``) until :meth:`seal`."""
        return pack.PackWriter(self.store.create(), self.blobs)

    def seal(self, writer: pack.PackWriter) -> SealedPack:
        """The one way a pack is finished: trailer and footer written and the object committed by the store
        (local: fsynced, renamed into ``packs/``, the directory fsynced; docs/format.md §8). Only the returned
        value may be handed to an index transaction, so no transaction can point at a pack that is not
        durable. On any error the temp file is removed."""
        try:
            pack_id, size = writer.finish()
        except BaseException:
            writer.abort()
            raise
        sealed = SealedPack.from_entries(pack_id, size, writer.entries)
        if self.remote:
            # The pack's index object: the commit point for every other host (repo/indexobjects.py). If it
            # cannot be written, the pack goes too (best effort), as a local pack whose commit failed does:
            # an orphan holding a snapshot record would stop prune until 'repair index'.
            data = indexobjects.encode([(sealed, writer.metadata)], self.blobs)
            name = indexobjects.name_of(data)
            try:
                indexobjects.write(self.store, name, data)
            except (StoreError, OSError):  # the request failed (not an interrupt, which is passed on)
                if not self._landed(name, sealed):
                    raise
                # Written after all (only its answer was lost): committed, as if the answer had come.
            except BaseException:
                self._landed(name, sealed)
                raise
            sealed = replace(sealed, published=name)
        return sealed

    def _landed(self, name: str, sealed: SealedPack) -> bool:
        """After a failed PUT of the index object ``name`` of ``sealed``: whether it is in the store after all.
        Another host may have read it already and deduplicated against the pack, so neither is ever deleted
        then. Only an object surely not there lets the pack go (when the store cannot be asked, the pack
        stays: an orphan that prune removes, or that 'repair index' lists)."""
        try:
            self.store.size(name)
        except ObjectMissing:
            self.discard_unlisted(sealed)
            return False
        except (OSError, DedupimgError):
            return False
        return True

    def discard_unlisted(self, sealed: SealedPack) -> None:
        """Delete a sealed pack whose commit failed, unless the index lists that very file (same content), or
        an index object published it (remote: other hosts count it committed; this host's cache adds it at its
        next sync). Remote, only a pack holding a snapshot record goes: another host may have published a
        byte-identical pack of chunks under the same name, which this host's cache cannot know yet (a record
        is unique to its snapshot); prune, which sees every host's index objects, removes the rest."""
        if sealed.published is not None:
            return
        if self.remote and not any(b.type == pack.SNAPSHOT for b in sealed.blobs):
            return
        try:
            self.index.discard_unlisted(sealed.id, lambda: self.store.delete([pack.pack_name(sealed.id)]))
        except (OSError, DedupimgError):
            pass  # best effort: what is left is an orphan, which check reports and prune handles

    def pack_present(self, sealed: SealedPack) -> Callable[[], bool] | None:
        """For a local repository, the check that ``sealed``'s file is still there, for the transaction that
        commits it (:meth:`Index.discard_unlisted`); None for a remote one, whose packs are never deleted by
        another snapshot's failure (above)."""
        if self.remote:
            return None
        name = pack.pack_name(sealed.id)

        def present() -> bool:
            try:
                self.store.size(name)
            except ObjectMissing:
                return False
            return True

        return present

    def forgotten(self, record_id: bytes) -> bool:
        """Whether a forget (or tag) removed the record ``record_id`` from this repository: it is never listed
        again (copy skips it)."""
        return self.index.forgotten([record_id])[0]

    def left_out(self) -> list[SnapshotRecord]:
        """The snapshots ``repair index`` found but left out, their data incomplete (oldest first): not listed,
        not forgotten; prune keeps what they still have until ``forget --left-out`` forgets them."""
        ids = self.index.left_out()
        ids = [i for i, known in zip(ids, self.index.has_blobs(ids), strict=True) if known]
        records = [SnapshotRecord.decode(raw) for raw in self.read_blobs(ids)]
        return sorted(records, key=lambda r: (r.datetime, r.hex_id))

    def unknown_records(self, record_ids: list[bytes]) -> list[bytes]:
        """Those of ``record_ids`` (snapshot records found in packs the index does not list) that the index
        knows nothing of: not listed, no forgotten row, named by no tombstone. Such a record is a snapshot
        the index lost, or one whose last commit never happened (a crash); ``repair index`` lists either."""
        unknown = [i for i, k in zip(record_ids, self.index.has_blobs(record_ids), strict=True) if not k]
        if unknown:
            forgotten: set[bytes] = set()
            for raw in self.read_blobs(self.index.tombstone_ids()):
                forgotten.update(decode_tombstone(raw))
            unknown = [i for i in unknown if i not in forgotten]
        return unknown

    # -- repair (repo/repair.py) ------------------------------------------------------------------------------

    @staticmethod
    def rebuild_index(location: Path | str, lock_wait: float = 0.0,
                      progress: Progress | None = None) -> repair_mod.RepairReport:
        """Rebuild the index from the packs alone, never opening the old one (see repo/repair.py)."""
        from dedupimg.repo import repair as repair_mod  # imports this module: loaded on first use

        return repair_mod.repair_index(location, lock_wait, progress)

    # -- check (repo/audit.py) -------------------------------------------------------------------------------

    def audit(self, read_data: float = 0.0, progress: Progress | None = None,
              seed: bytes | None = None) -> audit_mod.CheckReport:
        """Prove the index and the packs consistent, and read ``read_data`` of the packs (see repo/audit.py);
        the caller holds at least a SHARED lock."""
        return audit_mod.audit(self, read_data, progress, seed)

    # -- prune: plan, then execute (repo/compaction.py) ---------------------------------------------------------

    def plan_prune(self, max_unused: float) -> compaction.PrunePlan:
        """What a prune would delete, rewrite and keep (reads only); the caller holds the exclusive lock."""
        return compaction.plan(self, max_unused)

    def execute_prune(self, plan: compaction.PrunePlan,
                      on_bytes: Callable[[int], None] | None = None) -> compaction.PruneOutcome:
        """Carry out a plan made by :meth:`plan_prune` under the same exclusive lock (an empty plan: nothing)."""
        if plan.empty:
            return compaction.PruneOutcome(0, 0, 0, 0, 0)
        return compaction.execute(self, plan, on_bytes)

    def writer(self) -> BlobWriter:
        return BlobWriter(self)


class _OpenPacks:
    """An LRU of open packs (store reader handles: local, a file descriptor) shared by reader threads; a
    handle is closed only when no thread uses it."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._lock = threading.Lock()
        self._open: OrderedDict[int, ObjectReader] = OrderedDict()  # pack number -> reader, oldest first
        self._users: dict[ObjectReader, int] = {}  # reader -> threads reading it now
        self._retired: set[ObjectReader] = set()  # evicted readers still in use: closed by their last user

    @contextmanager
    def use(self, pack_no: int) -> Iterator[ObjectReader]:
        reader = self._acquire(pack_no)
        try:
            yield reader
        finally:
            with self._lock:
                self._users[reader] -= 1
                if self._users[reader] == 0:
                    del self._users[reader]
                    if reader in self._retired:
                        self._retired.discard(reader)
                        reader.close()

    def _acquire(self, pack_no: int) -> ObjectReader:
        with self._lock:
            reader = self._open.get(pack_no)
            if reader is None:
                pack_id = self._repo.index.pack_id(pack_no)
                # IntegrityError: missing, not a file, ...; PermissionDenied
                reader = self._repo.store.open(pack.pack_name(pack_id), f"pack {pack.pack_file_name(pack_id)}")
                self._open[pack_no] = reader
                if len(self._open) > OPEN_PACKS:
                    self._retire(self._open.popitem(last=False)[1])
            self._open.move_to_end(pack_no)
            self._users[reader] = self._users.get(reader, 0) + 1
            return reader

    def _retire(self, reader: ObjectReader) -> None:
        if reader in self._users:
            self._retired.add(reader)
        else:
            reader.close()

    def close(self) -> None:
        with self._lock:
            for reader in self._open.values():
                self._retire(reader)
            self._open.clear()


class BlobWriter:
    """Stores new chunks and segments in packs and commits them, one index transaction per durable pack."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._compressor = pack.Compressor(repo.config.compression_level)
        self._pack: pack.PackWriter | None = None
        self._pending: set[bytes] = set()  # ids in the open pack or in packs being sealed (not yet indexed)
        self._segments: list[NewSegment] = []
        # Packs being sealed (uploaded) on other threads, oldest first, each committed to the index once its
        # upload is done: an object store's PUTs are slow one at a time, and several at once fill the link.
        self._sealing: deque[tuple[Future[SealedPack], set[bytes], list[NewSegment]]] = deque()
        self._uploads: ThreadPoolExecutor | None = None
        if repo.remote and UPLOADS_AHEAD:
            self._uploads = ThreadPoolExecutor(UPLOADS_AHEAD, thread_name_prefix="dedupimg-upload")
        self.stored_bytes = 0  # bytes of the packs this writer made durable
        self.new_chunks = 0
        self.new_chunk_bytes = 0

    def missing(self, ids: list[bytes]) -> list[bool]:
        """For each id, True when neither the index nor a pack not yet indexed has it (one read transaction)."""
        known = self._repo.index.has_blobs(ids)
        return [not k and i not in self._pending for i, k in zip(ids, known, strict=True)]

    def _open_pack(self) -> pack.PackWriter:
        if self._pack is None:
            self._pack = self._repo.new_pack()
        return self._pack

    def _add(self, type_: int, id_: bytes, raw: bytes | bytearray | memoryview) -> None:
        if id_ in self._pending:
            return  # the same blob twice in one pack: compress and store it once
        codec, stored = self._compressor.encode(raw)
        writer = self._pack_for(id_)
        if writer is not None:
            writer.add(type_, id_, codec, stored, len(raw))
            self._added(type_, id_, len(raw))

    def encode_chunk(self, id_: bytes, raw: bytes | bytearray | memoryview,
                     base: tuple[bytes, bytes] | None = None) -> EncodedBlob:
        """The chunk compressed and sealed as its pack will store it, for :meth:`add_encoded_chunk`; safe on
        any thread. A snapshot encodes on its pool beside the writing thread: AES-GCM holds the GIL, and
        sealing on the writing thread had cost an encrypted first snapshot 7% (2 GiB vm v1, medians of 3,
        2026-11-26 15:41 UTC: 5.48 s sealed there, 5.14 s on the pool; unencrypted 4.75 / 4.63 s)."""
        base_id, delta = b"", b""
        if base is not None and self._repo.config.deltas and base[0] != id_:
            base_id, delta = base[0], pack.encode_delta(raw, base[1], self._repo.config.compression_level)
        if delta and len(delta) * DELTA_SURE <= len(raw):
            codec, stored = pack.DELTA, delta  # a few changed bytes: zstd alone is not even tried
        else:
            codec, stored = self._compressor.encode(raw)
            if delta and len(delta) <= len(stored) * DELTA_MAX_SHARE:
                codec, stored = pack.DELTA, delta
            else:
                base_id = b""
        pieces, stored_len = self._repo.blobs.encode(pack.CHUNK, id_, codec, stored, len(raw))
        return EncodedBlob(pack.CHUNK, id_, codec, len(raw), pieces, stored_len, base_id)

    def add_encoded_chunk(self, blob: EncodedBlob) -> None:
        writer = self._pack_for(blob.id)
        if writer is not None:
            writer.add_encoded(blob)
            self._added(pack.CHUNK, blob.id, blob.raw_len)

    def _pack_for(self, id_: bytes) -> pack.PackWriter | None:
        """The open pack the blob ``id_`` goes to; None when a pack not yet indexed has it already."""
        if id_ in self._pending:
            return None
        if self._pack is not None and self._pack.size >= self._repo.config.pack_size:
            # A full pack is committed only here, before the next blob goes in, never right after an add:
            # so the blob added last (a snapshot record) is always in the open pack when commit_snapshot
            # commits that pack together with the record's listing (the bug of issue 11 §1 was a flush
            # after the record's add, which committed the record's pack without its listing).
            self._commit_open_pack(None)
        return self._open_pack()

    def _added(self, type_: int, id_: bytes, raw_len: int) -> None:
        self._pending.add(id_)
        if type_ == pack.CHUNK:
            self.new_chunks += 1
            self.new_chunk_bytes += raw_len

    def add_chunk(self, id_: bytes, raw: bytes | bytearray | memoryview) -> None:
        self._add(pack.CHUNK, id_, raw)

    def add_segment(self, segment: Segment) -> bytes:
        """Store ``segment`` unless an identical one exists; returns its id."""
        raw = segment.encode()
        seg_id = pack.blob_id(raw)
        # A stored segment, not just a blob row: a cache rebuilt from index objects (or an index rebuilt by
        # repair) has rows for segments in kept packs whose chunks are gone, and does not store those.
        if seg_id not in self._pending and not self._repo.index.has_segments([seg_id])[0]:
            self._segments.append(NewSegment(seg_id, raw, segment.chunk_ids()))
            self._add(pack.SEGMENT, seg_id, raw)
        return seg_id

    def commit_snapshot(self, record: SnapshotRecord) -> None:
        """Store the record as the last blob of the open pack and commit that pack and the record's listing
        in one index transaction: the snapshot is listed exactly when everything it needs is indexed."""
        raw = record.encode()
        if self._repo.index.forgotten([record.id])[0]:
            raise UsageError("this exact snapshot (same image, name, tags and --time) was taken and forgotten "
                             "before; give another --time")
        if self._repo.index.has_blobs([record.id])[0]:
            # The very same record (same image, name, time, tags and statistics) was stored before.
            if self._repo.index.get_snapshot(record.id) is None:
                raise UsageError("this exact snapshot (same image, name, tags and --time) was taken and "
                                 "forgotten before; give another --time")
            self.flush()
            self.close()
            return
        self._add(pack.SNAPSHOT, record.id, raw)
        self._commit_open_pack(NewSnapshot(record.id, raw, [sid for sid, _ in record.segments]))
        self.close()

    def flush(self) -> None:
        """Commit the open pack, if any, with no snapshot record (what an interrupted snapshot leaves)."""
        if self._pack is not None:
            self._commit_open_pack(None)
        self._drain(0)

    def _commit_open_pack(self, snapshot: NewSnapshot | None) -> None:
        writer = self._pack
        if writer is None:
            raise AssertionError("no open pack to commit")  # commit_snapshot always leaves its record there
        uploads = self._uploads if snapshot is None else None  # sealed in the background, or here
        if uploads is None:
            self._drain(0)  # a snapshot's record commits last: every pack before it is indexed first
        ids = {e.id for e in writer.entries}
        seg_ids = {e.id for e in writer.entries if e.type == pack.SEGMENT}
        segments = [s for s in self._segments if s.id in seg_ids]
        self._segments = [s for s in self._segments if s.id not in seg_ids]
        # From here the writer is seal's to finish or abort, and nothing runs in between: a Ctrl-C there would
        # leave its temp file, which abort() no longer sees.
        self._pack = None
        if uploads is not None:
            # Sealed on an upload thread; its ids stay pending (known to missing()) until it is indexed.
            self._sealing.append((uploads.submit(self._repo.seal, writer), ids, segments))
            self._drain(UPLOADS_AHEAD)
            return
        try:
            if snapshot is not None:
                # A lock lost meanwhile (an object store's: removed by 'unlock --remove-all' elsewhere, or not
                # refreshed in time) may have let a prune delete chunks this snapshot deduplicated against:
                # its record must not be listed. (Its packs stay, unlisted, for prune to remove.)
                self._repo.check_lock()
            sealed = self._repo.seal(writer)
        finally:
            self._pending -= ids
        self._index(sealed, segments, snapshot)

    def _drain(self, keep: int) -> None:
        """Index sealed packs, oldest first, until at most ``keep`` are still being sealed."""
        while self._sealing and (len(self._sealing) > keep or self._sealing[0][0].done()):
            future, ids, segments = self._sealing[0]
            try:
                sealed = future.result()
            finally:
                self._sealing.popleft()
                self._pending -= ids
            self._index(sealed, segments, None)

    def _index(self, sealed: SealedPack, segments: list[NewSegment], snapshot: NewSnapshot | None) -> None:
        self.stored_bytes += sealed.size
        try:
            if snapshot is not None:
                # The transaction that lists the snapshot starts: a signal from now on no longer stops the command
                # (marked before, not after the commit, so that no instant lies between the two in which an
                # interrupt would report a listed snapshot as not stored).
                interrupts.mark_committed()
            self._repo.index.commit_pack(sealed, segments, snapshot, self._repo.pack_present(sealed))
        except BaseException:
            # Not committed (a full disk, say): remove the pack so that it is not left as an orphan holding a
            # record the index does not know, which would make prune stop until 'repair index'.
            self._repo.discard_unlisted(sealed)
            raise

    def abort(self) -> None:
        """Drop the open pack and wait for packs being sealed; what was committed stays (unreferenced until a
        snapshot uses it), and a pack sealed but not indexed is an orphan, which prune collects."""
        if self._pack is not None:
            self._pack.abort()
            self._pack = None
        while self._sealing:
            future, _ids, _segments = self._sealing.popleft()
            future.cancel()
            try:
                future.result()
            except BaseException:  # noqa: BLE001, S110  (the error that made us abort is the one to report)
                pass
        self.close()
        self._pending.clear()
        self._segments.clear()

    def close(self) -> None:
        if self._uploads is not None:
            self._uploads.shutdown(wait=True)
            self._uploads = None


def _remember_encryption(cache: Path, config: Config, location: str) -> None:
    """This host remembers which remote repositories are encrypted: a config replaced by an unencrypted one (key
    objects deleted too) is refused instead of receiving plaintext. Both by repository id (a marker in its
    cache) and by location (``<cache root>/encrypted-locations/``): the id comes from the config, which the
    storage provider can replace with one naming another id, and so another, unmarked cache."""
    markers = [cache / ENCRYPTED_MARKER,
               cache.parent / ENCRYPTED_LOCATIONS / blake3.blake3(location.encode()).hexdigest()[:32]]
    if config.encrypted:
        for marker in markers:
            if not marker.exists():
                make_dirs(marker.parent)
                atomic_write(marker, f"{config.encryption}\n{location}\n".encode())
        return
    for marker in markers:
        if marker.exists():
            raise IntegrityError(f"repository {location} was encrypted when this host last used it ({marker}), but "
                                 "its config now says unencrypted: refusing to open it, which would store data "
                                 "unencrypted (if it was re-created on purpose, delete that file)")


def _config_file(config: Config, master: MasterKeys | None) -> bytes:
    """The bytes of the config file: the config, or for an encrypted repository its sealed form."""
    return config.to_bytes() if master is None else keys.seal_config(config, master).to_bytes()


def read_remote_config(store: Store) -> Config | SealedConfig:
    """The config object of a repository in an object store."""
    where = store.location(CONFIG)
    try:
        raw = store.read(CONFIG, where=where)
    except ObjectMissing:
        bucket_exists = getattr(store, "bucket_exists", None)
        if bucket_exists is not None and not bucket_exists():
            raise RepositoryNotFound(f"repository {store.location('').rstrip('/')} does not exist (no such bucket; "
                                     "'init' makes it)") from None
        raise NotARepository(f"{store.location('').rstrip('/')} is not a dedupimg repository (no config object)"
                             ) from None
    return parse_config_file(raw, where)


def _fresh_cache(home: Path) -> Path:
    """``home/index`` emptied, to build a cache in."""
    index_dir = home / INDEX
    if index_dir.exists() or index_dir.is_symlink():
        shutil.rmtree(index_dir) if index_dir.is_dir() and not index_dir.is_symlink() else index_dir.unlink()
    os.mkdir(index_dir, DIR_MODE)
    return index_dir


def _open_cache(home: Path) -> Index:
    """A remote repository's cache index: made when missing; a damaged one is thrown away and made again
    (the index objects in the store rebuild it: :meth:`Repository.sync`)."""
    index_dir = home / INDEX
    if (index_dir / DATA_FILE).is_file():
        try:
            return Index(index_dir)
        except IntegrityError:
            pass
    return Index(_fresh_cache(home), create=True)
