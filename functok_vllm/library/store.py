"""The steering library on disk: named vectors and presets in one directory, safe under concurrent writers and crashes.

Layout of the data directory (`functok serve --data-dir`; `additional_config.functok.library` for stock vLLM):

    library.json                   the index (below); replaced whole, never edited in place
    objects/<version>.safetensors  a vector's directions (`core.vector.Vector.to_bytes`), named by the hash of its
                                   content: written once, never changed, readable by any process
    tmp/                           files being written (a crash can leave some; the next writer's start removes them)
    .lock                          a writer holds an exclusive flock on it for the whole of one change

    library.json = {"format": 1, "d_model": 256, "generation": 12,
                    "vectors": {name: {"version", "hooks", "norms", "d_model", "source", "description",
                                       "created", "updated"}},
                    "presets": {name: {"steering", "description", "created", "updated"}}}

One change: take the lock; read library.json from disk (another process may have written since); check the change
against it; write the vector's object if its content is new, then the new index, each as a temp file that is
fsynced, renamed into place (`os.replace`, atomic) and made durable by fsyncing the directory; release the lock.
Readers never lock: library.json is replaced atomically, so a reader sees the old or the new index, whole, and an
object an index names was on disk before that index. A crash at any point leaves the old index; what it may leave
besides (a temp file, an object no index names) is removed when a writer next starts. Unnamed objects are removed
only then, never while this process serves: a request resolved to a version just before its name changed can still
read it.

Why a directory rather than SQLite: the contents are tensors, kept as safetensors files that other tools read and
that stock vLLM's API processes read without a database driver or a writer lock; the index is small, so replacing it
whole is cheap and makes every state a reader can see a complete one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from functok_vllm.core.vector import Vector, VectorError

FORMAT = 1
INDEX = "library.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' and '-', starting with a letter or a digit"
CACHED_VECTORS = 64  # contents kept in memory (immutable, so a cached one is never stale)
SHOWN_NAMES = 20  # names listed in a "no such vector" message


class LibraryError(Exception):
    """A change or a lookup the library refuses; the subclass says which kind (the server maps it to a status)."""


class NotFound(LibraryError):
    pass


class Conflict(LibraryError):
    """The name is taken, or the vector is named by a preset."""


class LimitReached(LibraryError):
    pass


class BadName(LibraryError):
    pass


class NotJSON(LibraryError):
    """A change that holds NaN or Infinity (refused before anything is written)."""


class StoreError(LibraryError):
    """The directory is not a usable library (corrupt index, another model's vectors)."""


def check_name(name: str, kind: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadName(f"{name!r} is not a valid {kind} name ({NAME_RULE})")
    return name


@dataclass(frozen=True)
class LibraryLimits:
    max_vectors: int = 256
    max_presets: int = 256


def vector_names(steering) -> set[str]:
    """Names of the vectors a preset's steering object uses."""
    edits = steering.get("edits", []) if isinstance(steering, dict) else []
    return {e["vector"] for e in edits if isinstance(e, dict) and isinstance(e.get("vector"), str)}


def claim(index: dict, kind: str, name: str, replace: bool, limit: int) -> dict | None:
    """The record `name` replaces in `index[kind]` ("vectors" or "presets"), or None for a new name: Conflict if it
    is taken and not `replace`, LimitReached if a new one would pass `limit`."""
    old = index[kind].get(name)
    if old is not None and not replace:
        raise Conflict(f"a {kind[:-1]} named {name!r} exists already (PUT /v1/steering/{kind}/{name} replaces it)")
    if old is None and len(index[kind]) >= limit:
        raise LimitReached(f"the library holds {len(index[kind])} {kind}, the limit (--max-{kind}); delete one first")
    return old


class Library:
    """One data directory. `writer=True` (the serving process): removes leftovers at start. Any number of processes
    may open the same directory; every change is serialised by the lock file."""

    def __init__(self, root: str | Path, d_model: int | None = None, limits=LibraryLimits(), writer: bool = False):
        self.root = Path(root)
        self.d_model, self.limits = d_model, limits
        self._seen: tuple | None = None  # (inode, mtime, size) of the index read last
        self._index = _empty(d_model)
        self._cache: OrderedDict[str, Vector] = OrderedDict()
        self._mutex = threading.Lock()  # the in-memory caches; the disk has its own lock
        index = self.index()
        if index["d_model"] is not None and d_model is not None and index["d_model"] != d_model:
            raise StoreError(
                f"{self.root}: this library holds vectors for d_model {index['d_model']}, the model's is {d_model} "
                "(use another data directory)"
            )
        if writer and (self.root / INDEX).exists():
            self._collect()

    # ---- reading (no lock) ----------------------------------------------------------------------------------------

    def index(self) -> dict:
        """The current index (re-read when library.json was replaced since the last read)."""
        path = self.root / INDEX
        try:
            st = path.stat()
        except FileNotFoundError:
            return self._index
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            index = _read_index(path)
            with self._mutex:
                self._index, self._seen = index, seen
        return self._index

    def vectors(self) -> dict[str, dict]:
        return self.index()["vectors"]

    def presets(self) -> dict[str, dict]:
        return self.index()["presets"]

    def vector_record(self, name: str) -> dict:
        rec = self.vectors().get(name)
        if rec is None:
            raise NotFound(f"no vector named {name!r}")
        return rec

    def preset_record(self, name: str) -> dict:
        rec = self.presets().get(name)
        if rec is None:
            raise NotFound(f"no preset named {name!r}")
        return rec

    def content(self, version: str) -> Vector:
        """The vector stored under `version` (its content id); FileNotFoundError if there is none."""
        with self._mutex:
            if version in self._cache:
                self._cache.move_to_end(version)
                return self._cache[version]
        if not re.fullmatch(r"[0-9a-f]{32}", version):
            raise FileNotFoundError(version)
        vector = Vector.from_bytes((self.root / "objects" / f"{version}.safetensors").read_bytes(), version)
        with self._mutex:
            self._cache[version] = vector
            while len(self._cache) > CACHED_VECTORS:
                self._cache.popitem(last=False)
        return vector

    def resolve(self, name: str, version: str | None = None) -> Vector:
        """The current content of `name` (LookupError saying why not); with `version`, only if that is current."""
        for _ in range(3):  # an object can vanish between reading an old index and opening it: read the index again
            rec = self.vectors().get(name)
            if rec is None:
                names = sorted(self.vectors())
                have = ", ".join(names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "")
                raise LookupError(f"no vector named {name!r} (vectors: {have or 'none'})")
            if version is not None and version != rec["version"]:
                raise LookupError(
                    f"vector {name!r} is at version {rec['version']}, not {version} (it changed; give no 'version' "
                    "to use the current one)"
                )
            try:
                return self.content(rec["version"])
            except FileNotFoundError:
                self._seen = None
            except VectorError as e:
                raise LookupError(f"vector {name!r}: its stored content cannot be read ({e})") from None
        raise LookupError(f"vector {name!r}: its content {rec['version']} is missing from {self.root / 'objects'}")

    # ---- changes (under the lock) ---------------------------------------------------------------------------------

    def put_vector(
        self, name: str, vector: Vector, source: dict, description: str = "", replace: bool = False
    ) -> tuple[dict, bool]:
        """Store `vector` as `name`: (its record, whether it is new). Conflict if the name is taken and not `replace`;
        LimitReached past `max_vectors`."""
        check_name(name, "vector")
        if self.d_model is not None and vector.d_model != self.d_model:
            raise VectorError(f"the vector is {vector.d_model} wide; this model's d_model is {self.d_model}")
        with self._change() as index:
            old = claim(index, "vectors", name, replace, self.limits.max_vectors)
            self._write_object(vector)
            now = time.time()
            rec = {
                "version": vector.id,
                "hooks": list(vector.directions),
                "norms": vector.norms(),
                "d_model": vector.d_model,
                "source": source,
                "description": description,
                "created": old["created"] if old else now,
                "updated": now,
            }
            index["vectors"][name] = rec
            index["d_model"] = index["d_model"] or vector.d_model
        return rec, old is None

    def delete_vector(self, name: str, also_used_by: set[str] = frozenset()) -> dict:
        """Remove `name` (its content stays until the next start); Conflict while a preset names it."""
        with self._change() as index:
            rec = index["vectors"].get(name)
            if rec is None:
                raise NotFound(f"no vector named {name!r}")
            users = sorted(p for p, r in index["presets"].items() if name in vector_names(r["steering"]))
            users += sorted(also_used_by)
            if users:
                raise Conflict(f"vector {name!r} is used by presets {', '.join(users)}; change or delete them first")
            del index["vectors"][name]
        return rec

    def put_preset(self, name: str, steering: dict, description: str = "", replace: bool = False) -> tuple[dict, bool]:
        """Store a preset (a steering object, checked by the caller); Conflict if the name is taken and not
        `replace`, or if it names a vector that is not in the library now."""
        check_name(name, "preset")
        with self._change() as index:
            old = claim(index, "presets", name, replace, self.limits.max_presets)
            gone = sorted(vector_names(steering) - set(index["vectors"]))
            if gone:
                raise Conflict(f"the preset names vectors that are not in the library: {', '.join(gone)}")
            now = time.time()
            rec = {"steering": steering, "description": description, "created": old["created"] if old else now}
            index["presets"][name] = rec | {"updated": now}
        return index["presets"][name], old is None

    def delete_preset(self, name: str) -> dict:
        with self._change() as index:
            rec = index["presets"].pop(name, None)
            if rec is None:
                raise NotFound(f"no preset named {name!r}")
        return rec

    @contextmanager
    def _change(self):
        """The index as on disk now, under the lock; written back (atomically, durably) if the block succeeds."""
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("objects", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a new open file each change: threads of one process exclude each other
            try:
                index = _read_index(self.root / INDEX) if (self.root / INDEX).exists() else _empty(self.d_model)
                yield index
                index["generation"] += 1
                try:  # strict JSON: the index never holds what its own reader (and other tools) would refuse
                    text = json.dumps(index, indent=1, sort_keys=True, allow_nan=False)
                except ValueError as e:
                    raise NotJSON(
                        f"the change holds a number JSON cannot represent ({e}); nothing was stored"
                    ) from None
                self._atomic_write(self.root / INDEX, text.encode())
                self._seen = None
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_object(self, vector: Vector) -> None:
        path = self.root / "objects" / f"{vector.id}.safetensors"
        if path.exists():  # content-addressed: the same bytes are there already
            return
        self._atomic_write(path, vector.to_bytes())

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = self.root / "tmp" / f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def _collect(self) -> None:
        """Remove temp files and objects no index names (at start-up: nothing of this process refers to them)."""
        with self._change() as index:
            keep = {rec["version"] for rec in index["vectors"].values()}
            for f in (self.root / "tmp").iterdir():
                f.unlink(missing_ok=True)
            for f in (self.root / "objects").iterdir():
                if f.name.removesuffix(".safetensors") not in keep:
                    f.unlink(missing_ok=True)
            index["generation"] -= 1  # rewritten unchanged


def _empty(d_model: int | None) -> dict:
    return {"format": FORMAT, "d_model": d_model, "generation": 0, "vectors": {}, "presets": {}}


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: not a readable library index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not {"vectors", "presets"} <= set(index):
        raise StoreError(f"{path}: not a functok library index (format {FORMAT})")
    return index


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
