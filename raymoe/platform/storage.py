"""Where run outputs and checkpoints live: local paths and storage URIs (``s3://``, ``gs://``, ``hdfs://``, ...).

A *location* is a :class:`pathlib.Path` (a local path or a ``file://`` URI: the POSIX fast path, writes go to a
temporary name, are fsynced and renamed) or a :class:`RemotePath` (any other URI: a ``pyarrow.fs`` filesystem and
a path in it, resolved with ``pyarrow.fs.FileSystem.from_uri`` as Ray Train resolves its ``storage_path``).
Credentials and endpoints come from the filesystem's usual sources (S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ~/.aws) or from the URI's query, which travels
with every location derived from it (``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http``).

A write to a remote location is one object that appears whole or not at all when the stream is closed (object
stores have no rename, and none is needed): a writer killed mid-write leaves no object, or the previous one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union
from urllib.parse import urlsplit

_CHUNK = 1 << 22  # streamed reads and copies move 4 MiB at a time


def is_uri(where) -> bool:
    """True for a string naming a storage URI (``scheme://...``), local (``file://``) or not."""
    return isinstance(where, RemotePath) or (isinstance(where, str) and len(urlsplit(where).scheme) > 1
                                             and "://" in where)


class RemotePath:
    """A location in a non-local ``pyarrow.fs`` filesystem, named by its URI; joins like a ``pathlib.Path``
    (``/``, ``name``, ``parent``). ``str()`` gives the URI back (query included), so it travels as a string.
    It is no local path: ``os.fspath`` (hence ``open``, ``Path(...)``) raises a TypeError naming it."""

    __slots__ = ("scheme", "netloc", "key", "query")

    def __init__(self, uri: str):
        u = urlsplit(str(uri))
        if len(u.scheme) <= 1 or u.scheme == "file":
            raise ValueError(f"{uri!r}: not a remote storage URI (scheme://bucket/path)")
        self.scheme, self.netloc, self.key, self.query = u.scheme, u.netloc, u.path.strip("/"), u.query

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}/{self.key}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self):
        return RemotePath, (str(self),)

    def __fspath__(self):
        raise TypeError(f"{self}: a storage URI, not a local path; this reader needs a local path (copy it "
                        "locally first)")

    def _with_key(self, key: str) -> "RemotePath":
        out = object.__new__(RemotePath)
        out.scheme, out.netloc, out.key, out.query = self.scheme, self.netloc, key, self.query
        return out

    def __truediv__(self, part) -> "RemotePath":
        part = str(part).strip("/")
        return self._with_key(f"{self.key}/{part}" if self.key else part) if part else self

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        return self._with_key(self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def fs(self):
        """The pyarrow filesystem (one per scheme, host, query and credentials environment, per process)."""
        return _filesystem(self.scheme, self.netloc, self.query, _env_key())[0]

    @property
    def fs_path(self) -> str:
        """This location's path inside :attr:`fs`."""
        root = _filesystem(self.scheme, self.netloc, self.query, _env_key())[1].rstrip("/")
        return f"{root}/{self.key}" if self.key else (root or "/")


Location = Union[Path, RemotePath]


def _env_key() -> tuple:
    # a filesystem is built from the environment: a changed endpoint or credential gets a new one
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS_"))))


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, query: str, env: tuple):
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(f"{scheme}://{netloc}/" + (f"?{query}" if query else ""))
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
        raise ValueError(f"{scheme}://{netloc}: cannot open this storage location with pyarrow.fs ({e})") from None


def location(where) -> Location:
    """The location ``where`` names: a :class:`RemotePath` for a URI other than ``file://``, else a ``Path``
    (``file:///abs/path`` becomes ``/abs/path``; a plain path is kept as given, relative or not)."""
    if isinstance(where, (Path, RemotePath)):
        return where
    where = os.fspath(where)
    if is_uri(where):
        u = urlsplit(where)
        return Path(u.netloc + u.path) if u.scheme == "file" else RemotePath(where)
    return Path(where)


def join(where, *parts) -> Location:
    """``where`` / ``parts``, for any location."""
    loc = location(where)
    for part in parts:
        loc = loc / part
    return loc


def absolute(where) -> Location:
    """``where`` as a location, made absolute if it is a local path (for messages and for other processes)."""
    loc = location(where)
    return loc.absolute() if isinstance(loc, Path) else loc


def is_remote(where) -> bool:
    """True if ``where`` names a remote location (a URI other than ``file://``)."""
    return isinstance(location(where), RemotePath)


def _not_found(loc: Location) -> FileNotFoundError:
    return FileNotFoundError(f"{loc}: no such file")


def _info(loc: RemotePath):
    return loc.fs.get_file_info(loc.fs_path)


def is_file(loc: Location) -> bool:
    if isinstance(loc, RemotePath):
        from pyarrow import fs as pafs

        return _info(loc).type == pafs.FileType.File
    return loc.is_file()


def is_dir(loc: Location) -> bool:
    """True for a folder; on an object store, for a prefix that holds objects."""
    if isinstance(loc, RemotePath):
        from pyarrow import fs as pafs

        return _info(loc).type == pafs.FileType.Directory
    return loc.is_dir()


@contextmanager
def open_input(loc: Location) -> Iterator:
    """A binary file to read (``read(n)``; seekable), streamed from the storage."""
    try:
        f = loc.fs.open_input_file(loc.fs_path) if isinstance(loc, RemotePath) else open(loc, "rb")
    except FileNotFoundError:
        raise _not_found(loc) from None
    with f:
        yield f


def read_bytes(loc: Location) -> bytes:
    """The whole content of the file at ``loc`` (FileNotFoundError naming it if there is none)."""
    with open_input(loc) as f:
        return f.read()


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode()


def digest(loc: Location) -> tuple[int, str]:
    """(size, sha256 hex) of the file at ``loc``, streamed from the storage (never from a local copy)."""
    with open_input(loc) as f:
        return _hashed_copy(f)


def _hashed_copy(fin, fout=None) -> tuple[int, str]:
    """(size, sha256 hex) of the stream ``fin``, read in chunks, each also written to ``fout`` if given."""
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: fin.read(_CHUNK), b""):
        h.update(chunk)
        size += len(chunk)
        if fout is not None:
            fout.write(chunk)
    return size, h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


@contextmanager
def _staged(loc: Path) -> Iterator[Path]:
    """A unique temporary name beside ``loc`` (replicas may race on one file); if the block ends without error,
    fsync it, rename it to ``loc`` and fsync the folder."""
    loc.parent.mkdir(parents=True, exist_ok=True)
    tmp = loc.with_name(f".{loc.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, loc)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(loc.parent)


@contextmanager
def open_output(loc: Location) -> Iterator:
    """A binary stream whose content becomes the file at ``loc`` only when the block ends without error.

    Local: written under a temporary name, then fsynced and renamed. Remote: one object, whole, at close (a
    multipart upload is completed only then, so a writer killed mid-write leaves nothing). Parent folders are
    created as needed."""
    if isinstance(loc, RemotePath):
        stream = loc.fs.open_output_stream(loc.fs_path)
        try:
            yield stream
        except BaseException:
            # pyarrow streams cannot abort and closing completes the object with what it holds: delete it
            stream.close()
            remove_file(loc)
            raise
        stream.close()
        return
    with _staged(loc) as tmp, open(tmp, "wb") as f:
        yield f


def write_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` as the file at ``loc``, whole or not at all (see :func:`open_output`)."""
    with open_output(loc) as f:
        f.write(data)


class HashedOutput:
    """A binary stream that hashes what goes through it: ``size`` and ``sha256`` of everything written."""

    def __init__(self, f):
        self._f, self._hash, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self._f.write(data)
        self._hash.update(data)
        self.size += n
        return n

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


@contextmanager
def write_file(loc: Location) -> Iterator[HashedOutput]:
    """A binary stream (a :class:`HashedOutput`: its ``size`` and ``sha256`` are the file's once the block
    ends) whose content becomes the file at ``loc`` whole or not at all, written as it comes (never held in
    memory whole). Local: under a temporary name beside ``loc``, fsynced and renamed. Remote: to a local
    temporary file, then streamed up as one object (a writer keeping several files open buffers none of them)."""
    if not isinstance(loc, RemotePath):
        with open_output(loc) as f:
            yield HashedOutput(f)
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "part"
        with open(src, "wb") as f:
            out = HashedOutput(f)
            yield out
        if _copy_hashed(src, loc) != (out.size, out.sha256):
            raise OSError(f"{loc}: the local copy changed while it was uploaded")


def _copy_hashed(src: Path, loc: Location) -> tuple[int, str]:
    with open(src, "rb") as fin, open_output(loc) as fout:
        return _hashed_copy(fin, fout)


def upload(src: Path, loc: Location) -> None:
    """Copy the local file ``src`` to ``loc``, streamed (whole or not at all)."""
    with open(src, "rb") as fin, open_output(loc) as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)


def download(loc: Location, dst: Path) -> tuple[int, str]:
    """Copy the file at ``loc`` to the local file ``dst``, streamed; returns its (size, sha256), hashed as it
    is copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open_input(loc) as fin, open(dst, "wb") as fout:
        return _hashed_copy(fin, fout)


def list_files(loc: Location) -> dict[str, int]:
    """{path relative to ``loc`` (posix): size} of every file under ``loc``, recursively ({} if none)."""
    if isinstance(loc, RemotePath):
        from pyarrow import fs as pafs

        base = loc.fs_path.rstrip("/") + "/"
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.fs_path, recursive=True, allow_not_found=True))
        return {i.path[len(base):]: i.size for i in infos if i.type == pafs.FileType.File}
    if not loc.is_dir():
        return {}
    return {p.relative_to(loc).as_posix(): p.stat().st_size for p in sorted(loc.rglob("*")) if p.is_file()}


def list_dir(loc: Location) -> list[str]:
    """Names of the entries right under ``loc`` (files and folders / prefixes), [] if there is none."""
    if isinstance(loc, RemotePath):
        from pyarrow import fs as pafs

        infos = loc.fs.get_file_info(pafs.FileSelector(loc.fs_path, allow_not_found=True))
        return sorted(i.base_name for i in infos)
    return sorted(p.name for p in loc.iterdir()) if loc.is_dir() else []


def remove_file(loc: Location) -> None:
    """Delete the file at ``loc`` if there is one."""
    if isinstance(loc, RemotePath):
        if is_file(loc):
            loc.fs.delete_file(loc.fs_path)
    else:
        loc.unlink(missing_ok=True)


def remove_tree(loc: Location) -> None:
    """Delete ``loc`` and everything under it (every object under the prefix), if there is anything."""
    if isinstance(loc, RemotePath):
        if is_dir(loc):
            loc.fs.delete_dir(loc.fs_path)
    else:
        shutil.rmtree(loc, ignore_errors=True)


class RunOutputs:
    """A run folder ``<output_dir>/<name>`` at any location, and the local folder its logs are written in.

    Logs are appended to as the run goes (metrics.jsonl), which object stores cannot do: for a remote run folder
    they are written to a local copy (``$RAYMOE_RESULTS_DIR/storage/<scheme>/<host>/<path>``, default under
    ~/raymoe_results) and uploaded by :meth:`push` (at each checkpoint commit and at the end of the run). For a
    local run folder both are the same folder and ``push``/``pull`` do nothing."""

    def __init__(self, output_dir, name: str):
        self.location: Location = join(output_dir, name)
        self.checkpoints: Location = self.location / "checkpoints"
        if isinstance(self.location, RemotePath):
            from raymoe.config import DEFAULT_RESULTS_DIR, RESULTS_DIR_ENV

            base = Path(os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR).expanduser()
            loc = self.location
            host = loc.netloc.rsplit("@", 1)[-1].replace(":", "_")  # never credentials in a local path
            self.local = base / "storage" / loc.scheme / host / loc.key
        else:
            self.local = self.location

    def __str__(self) -> str:
        """Where the outputs go, as printed at the start of a run."""
        if self.remote:
            return f"{self.location} (logs written to {self.local} first, uploaded at each checkpoint)"
        return str(self.location)

    @property
    def remote(self) -> bool:
        return isinstance(self.location, RemotePath)

    def push(self) -> None:
        """Upload the local log files (everything but ``checkpoints/``) to the run folder."""
        if self.remote and self.local.is_dir():
            for p in sorted(self.local.rglob("*")):
                rel = p.relative_to(self.local).as_posix()
                if p.is_file() and not rel.startswith("checkpoints/"):
                    upload(p, self.location / rel)

    def pull(self, refresh: bool = False) -> None:
        """Before resuming a run whose logs are not here (another machine wrote them): download them
        (``refresh``: also when a local copy exists, e.g. to plot the latest uploaded logs)."""
        if self.remote and (refresh or not (self.local / "metrics.jsonl").exists()):
            for rel in list_files(self.location):
                if not rel.startswith("checkpoints/"):
                    download(self.location / rel, self.local / rel)
