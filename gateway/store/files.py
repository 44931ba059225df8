"""Durable files: the spool of raw mails and the content-addressed attachment store.

A file is durable once it was written to a temporary name, fsynced, renamed into place and its
directory fsynced (Mailman's switchboard, Postfix's queue). A crash leaves at worst a temporary
file, which `Spool.sweep()` removes on the next start. The spool's journal is the exception: it
is created in place and grows, and a mail in it is durable once the file system was synced
after the journal's creation and the journal's data after the mail's write (a crash leaves at
worst a tail, or a journal, that no row names).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
TMP = "tmp"
BATCH = ".batch"
JOURNAL_LIMIT = 64 << 20  # bytes of lone mails in one spool file

datasync_fd = getattr(os, "fdatasync", os.fsync)  # a file's data; its size counts as data


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(
    target: Path, data: bytes | Sequence[bytes], tmp_dir: Path, sync: bool = True
) -> None:
    """Write, fsync, rename, fsync the directory (and the entry of each directory made for
    it); `sync=False` leaves the fsyncs to the caller. `data` may be several buffers, written
    one after the other without joining them. Plain os calls: this runs once per accepted
    batch, and pathlib's objects cost more than a write."""
    parent = os.path.dirname(target)
    _ensure_dir(parent)
    tmp = f"{tmp_dir}/{os.getpid()}-{os.urandom(8).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for chunk in [data] if isinstance(data, bytes) else data:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, target)
    if sync:
        sync_entries(parent)


def sync_entries(directory: str) -> None:
    """A new file's entry in `directory` made durable, and the entries of `directory` and
    its parent where this process made them and has not synced them yet."""
    fsync_dir(directory)
    made = _unsynced(directory)
    for new in made:
        fsync_dir(os.path.dirname(new))
    _UNSYNCED_DIRS.difference_update(made)


_KNOWN_DIRS: set[str] = set()  # exist
_UNSYNCED_DIRS: set[str] = set()  # made here, their entries not yet synced


def _ensure_dir(path: str) -> None:
    """Create `path` (and its parent) when missing. Those it creates stay unsynced until a
    `sync_entries` of theirs: a write that fails first leaves them to the next one, which
    would otherwise find them in place and take them for durable."""
    if path in _KNOWN_DIRS:
        return
    created = [d for d in (os.path.dirname(path), path) if not os.path.isdir(d)]
    os.makedirs(path, exist_ok=True)
    _UNSYNCED_DIRS.update(created)
    _KNOWN_DIRS.add(path)


def _unsynced(directory: str) -> list[str]:
    return [d for d in (os.path.dirname(directory), directory) if d in _UNSYNCED_DIRS]


def datasync_files(paths: Iterable[Path | str]) -> None:
    """Each file's data flushed after a syncfs, which is what hears of an error writing them:
    syncfs reports a write error to whoever asks first, and only on a descriptor opened before
    the error (Linux 5.8; never before), so another thread's or process's sync may have been
    told instead. A file's own flush reports an error on its pages until someone flushes that
    file, and costs little once the syncfs has written them."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            datasync_fd(fd)
        finally:
            os.close(fd)


def probe_dir(directory: Path) -> None:
    """Create, write, fsync and remove a file: what accepting a mail needs of the spool.
    A real write, not os.access: root passes every permission check."""
    path = directory / f"{os.getpid()}-health-{os.urandom(4).hex()}.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def on_fd(fd: int, call: Callable[[int], object]) -> Callable[[], None]:
    """`call(fd)` to be made later (on a helper thread), the descriptor closed after it."""

    def run() -> None:
        try:
            call(fd)
        finally:
            os.close(fd)

    return run


class Beside:
    """A helper thread for one system call at a time (a sync), made while the caller goes on
    with work of its own. `start` returns once the helper is about to make the call: a helper
    still waiting to start would wait for the caller's work to let go of the interpreter's
    lock, and the two would take turns instead of overlapping. Whatever the call needs (a
    file opened) is prepared by the caller before `start`, for the same reason."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def start(self, call: Callable[[], T]) -> Future[T]:
        """`call` on the helper; made here instead, before returning, when no helper thread
        can be had (the interpreter shutting down): either way it is made exactly once."""
        if self._pool is None or self._pid != os.getpid():  # a forked child has no thread
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
            self._pid = os.getpid()
        inside = threading.Event()

        def run() -> T:
            inside.set()
            return call()

        try:
            done = self._pool.submit(run)
        except RuntimeError:
            # A thread that could not start leaves the call queued for the next one: never.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            done = Future()
            try:
                done.set_result(call())
            except BaseException as exc:
                done.set_exception(exc)
            return done
        inside.wait()
        return done

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown()
        self._pool = None


@dataclass
class _Journal:
    """The batch file a Spool appends lone mails to; only its own process writes to it."""

    name: str
    file: io.FileIO
    size: int
    pid: int
    entry_durable: bool = False  # its directory entry (and new directories) flushed


class Spool:
    """Raw mails as received, kept for the life of the inbound row (audit, replay).

    Mails accepted together (an SMTP group commit, an IMAP fetch, an import batch) share one
    file, `ab/<random>.batch`, the raw mails one after the other, and each is named by its
    span: `ab/<random>.batch#<offset>+<length>`. A mail accepted alone (`ingest`, an SMTP
    session alone in its batch) is appended to the Spool's journal, a batch file that this
    Spool alone writes to, named the same way. Creating a file costs more than writing a mail
    into it, and making a new file durable flushes its directory entry as well (a file system
    wide sync); appending to a file whose entry is durable flushes that file's data alone.
    """

    def __init__(self, root: Path, journal_limit: int = JOURNAL_LIMIT) -> None:
        self.root = root
        self.tmp = root / TMP
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.journal_limit = journal_limit
        self._journal: _Journal | None = None
        self._journals: set[str] = set()  # every journal this spool wrote to
        self._appending = threading.Lock()  # transports may write from any thread
        self._helper = Beside("sync")

    def new_name(self) -> str:
        name = os.urandom(16).hex()
        return f"{name[:2]}/{name}{BATCH}"

    def write_many(self, raws: Sequence[bytes], sync: bool = True) -> list[str]:
        """The mails' names, all of them written to one new file (or to the journal, when
        alone)."""
        if len(raws) == 1:
            names = [self._append(raws[0])]
            if sync:
                self.sync(names)
            return names
        batch = self.new_name()
        write_durably(self.root / batch, raws, self.tmp, sync)
        names, offset = [], 0
        for raw in raws:
            names.append(f"{batch}#{offset}+{len(raw)}")
            offset += len(raw)
        return names

    def _append(self, raw: bytes) -> str:
        """A lone mail written at the end of the journal. A write that fails leaves the
        journal's end where it was, so the next mail overwrites what it left."""
        with self._appending:
            journal = self._journal_for(len(raw))
            fd, offset, view, written = journal.file.fileno(), journal.size, memoryview(raw), 0
            while written < len(raw):
                written += os.pwrite(fd, view[written:], offset + written)
            journal.size += len(raw)
            return f"{journal.name}#{offset}+{len(raw)}"

    def _journal_for(self, size: int) -> _Journal:
        """The journal to append `size` bytes to: a new one when there is none yet, when it
        is full, or when it belongs to the process this one was forked from."""
        journal = self._journal
        if journal is not None and journal.pid == os.getpid():
            if journal.size == 0 or journal.size + size <= self.journal_limit:
                return journal
            journal.file.close()
        name = self.new_name()
        path = self.root / name
        _ensure_dir(os.path.dirname(path))
        self._journal = _Journal(name, io.FileIO(path, "xb"), 0, os.getpid())
        self._journals.add(name)
        return self._journal

    def close(self) -> None:
        if self._journal is not None and self._journal.pid == os.getpid():
            self._journal.file.close()
        self._journal = None
        self._helper.close()

    def sync(self, names: list[str]) -> None:
        """Make written mails durable, for a batch: the journal's data alone when they are
        all in it and its entry is durable, else one syncfs where Linux has it (files and
        directory entries in one call; then each file's data, to hear of an error on it),
        else each file and directory once."""
        self._syncer(names)()

    def sync_beside(self, names: list[str]) -> Future[None]:
        """`sync` on a helper thread, while the caller goes on with work of its own (parsing
        the mail); its result is the sync's end. What the sync needs is opened here, so that
        the helper has nothing but the system call left to do (`Beside`)."""
        return self._helper.start(self._syncer(names))

    def _syncer(self, names: list[str]) -> Callable[[], None]:
        files = {span(n)[0] for n in names}
        with self._appending:  # a descriptor of its own: a full journal may close meanwhile
            journal = self._journal
            if journal is not None and journal.entry_durable and files == {journal.name}:
                return on_fd(os.dup(journal.file.fileno()), datasync_fd)

        def sync(fd: int) -> None:
            if _syncfs_fd(fd):
                datasync_files(self.root / f for f in files)
            else:
                self._sync_each(names)
            if journal is not None and journal.name in files:
                journal.entry_durable = True

        return on_fd(os.open(self.root, os.O_RDONLY | os.O_DIRECTORY), sync)

    def discard(self, names: list[str]) -> None:
        """Remove the batch files of mails that were not accepted after all (patient data
        that nothing refers to); a journal, shared with mails that were, stays."""
        with self._appending:
            journals = set(self._journals)
        for file in {span(n)[0] for n in names} - journals:
            with contextlib.suppress(OSError):  # gone, or the spool itself is what failed
                os.unlink(self.root / file)

    def _sync_each(self, names: list[str]) -> None:
        files = {self.root / span(n)[0] for n in names}
        for path in files:
            fsync_file(path)
        for directory in {path.parent for path in files}:
            fsync_dir(directory)
        fsync_dir(self.root)

    def read(self, name: str) -> bytes:
        file, where = span(name)
        if where is None:
            return (self.root / file).read_bytes()
        offset, length = where
        with open(self.root / file, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        if len(raw) != length:
            raise OSError(f"spool file {file} is shorter than the span of {name}")
        return raw

    def exists(self, name: str) -> bool:
        file, where = span(name)
        path = self.root / file
        if where is None:
            return path.is_file()
        return path.is_file() and path.stat().st_size >= sum(where)

    def files(self) -> list[str]:
        """Every file the spool holds (not its temporary ones), relative to it."""
        return sorted(
            str(p.relative_to(self.root))
            for p in self.root.glob("*/*")
            if p.parent.name != TMP and p.suffix in (".eml", BATCH)
        )

    def sweep(self) -> int:
        return sweep(self.tmp)


def span(name: str) -> tuple[str, tuple[int, int] | None]:
    """A spool name's file, and the (offset, length) of its mail in a batch file."""
    file, sep, where = name.partition("#")
    if not sep:
        return file, None
    offset, _, length = where.partition("+")
    return file, (int(offset), int(length))


def sweep(tmp_dir: Path) -> int:
    """Remove temporary files whose writer is gone (named `<pid>-…`); returns how many.
    A live writer's file is left alone: an `ingest` may be writing while `serve` starts."""
    removed = 0
    for tmp in tmp_dir.glob("*.tmp"):
        pid = tmp.name.partition("-")[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _syncfs(path: Path) -> bool:
    """syncfs(2) on the file system holding `path`; False where it is not available."""
    if _LIBC is None or not hasattr(_LIBC, "syncfs"):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _syncfs_fd(fd)
    finally:
        os.close(fd)


def _syncfs_fd(fd: int) -> bool:
    return _LIBC is not None and hasattr(_LIBC, "syncfs") and int(_LIBC.syncfs(fd)) == 0


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Blobs:
    """Attachments under ab/cd/<sha256>: same bytes stored once, names never in a path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / TMP
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._unsure: set[Path] = set()  # in place, but their names' sync failed (put_many)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, sha256: str, data: bytes) -> None:
        target = self.path(sha256)
        if not self._in_place(target):
            write_durably(target, data, self.tmp)

    def _in_place(self, target: Path) -> bool:
        """Stored already, and durably: a file whose names `put_many` failed to sync is
        synced now, before a row may name it."""
        if not target.exists():
            return False
        if target in self._unsure:
            fsync_file(target)
            sync_entries(str(target.parent))
            self._unsure.discard(target)
        return True

    def put_chunks(self, sha256: str, chunks: Iterable[bytes]) -> None:
        """A large attachment, written as its pieces are decoded: never whole in memory.
        Durable as `write_durably` makes a file: temp, fsync, rename, directory fsync."""
        target = self.path(sha256)
        if self._in_place(target):
            return
        _ensure_dir(str(target.parent))
        tmp = self.tmp / f"{os.getpid()}-{os.urandom(8).hex()}.tmp"
        try:
            with open(tmp, "xb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a long-lived worker would not sweep it before a restart
            raise
        os.rename(tmp, target)
        sync_entries(str(target.parent))

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Several attachments (sha256, bytes) made durable together, for a batch: two flushes
        for all of them instead of two or more per file. As with `put`, a file appears under
        its name only once its bytes are durable: all are written to temporary names, synced,
        renamed, and the new names synced before this returns."""
        todo = {sha: data for sha, data in items if not self.path(sha).exists()}
        if not todo:
            return
        written: list[tuple[str, Path]] = []
        try:
            for sha, data in todo.items():
                written.append((self._unsynced_tmp(data), self.path(sha)))
            self._sync([tmp for tmp, _ in written], [])
            directories: set[str] = set()
            for tmp, target in written:
                _ensure_dir(str(target.parent))
                directories.add(str(target.parent))
                directories.update(os.path.dirname(d) for d in _unsynced(str(target.parent)))
                os.rename(tmp, target)
        except BaseException:
            for tmp, _ in written:  # a long-lived worker would not sweep them before a restart
                Path(tmp).unlink(missing_ok=True)
            raise
        try:
            self._sync([], sorted(directories))
        except BaseException:
            self._unsure.update(target for _, target in written)
            raise
        for _, target in written:
            _UNSYNCED_DIRS.difference_update(_unsynced(str(target.parent)))

    def _unsynced_tmp(self, data: bytes) -> str:
        tmp = f"{self.tmp}/{os.getpid()}-{os.urandom(8).hex()}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def _sync(self, files: list[str], directories: list[str]) -> None:
        """One syncfs where Linux has it (contents and names at once), else each one."""
        if _syncfs(self.root):
            datasync_files(files)
            return
        for path in files:
            fsync_file(Path(path))
        for directory in directories:
            fsync_dir(directory)

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def sweep(self) -> int:
        return sweep(self.tmp)
