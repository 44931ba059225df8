"""The attachment store's batch write, and an import batch storing its attachments through it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from gateway.app import App
from gateway.inbound import files
from gateway.pipeline import Pipeline
from gateway.store.files import Blobs
from tests.conftest import Clock, mail


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_many_stores_each_once_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    blobs = Blobs(tmp_path / "attachments")
    blobs.put(sha(b"old"), b"old")
    items = [(sha(d), d) for d in (b"one", b"two", b"old", b"one")]
    blobs.put_many(items)
    for digest, data in items:
        assert blobs.read(digest) == data
    assert not list(blobs.tmp.iterdir())


def test_put_many_failing_midway_leaves_no_file_behind(tmp_path: Path) -> None:
    blobs = Blobs(tmp_path / "attachments")
    with pytest.raises(TypeError):
        blobs.put_many([(sha(b"one"), b"one"), ("ab" * 32, "not bytes")])  # type: ignore[list-item]
    assert not blobs.path(sha(b"one")).exists()
    assert not list(blobs.tmp.iterdir())


def with_attachment(sender: str, data: bytes) -> bytes:
    return mail("Log", "See the log.", sender,
                attachments=[("log.bin", "application/octet-stream", data)])


def test_an_import_batch_stores_the_attachments_it_keeps(app: App, tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    kept = [os.urandom(3000) for _ in range(5)]
    for i, data in enumerate(kept):
        (folder / f"{i}.eml").write_bytes(with_attachment(f"gp{i}@practice.example", data))
    looped = os.urandom(3000)  # from our own address: a loop, which keeps nothing
    (folder / "9.eml").write_bytes(with_attachment("support@localhost", looped))
    outcomes = files.run_import(app.pipeline, folder, lambda n: None, batch=4, workers=2)
    assert (outcomes["created"], outcomes["loop"]) == (5, 1)
    stored = {r["sha256"] for r in app.db.rows("SELECT sha256 FROM attachments")}
    assert stored == {sha(d) for d in kept}
    for data in kept:
        assert app.blobs.read(sha(data)) == data
    assert not app.blobs.path(sha(looped)).exists()
    assert not list(app.blobs.tmp.iterdir())


class NoBatchBlobs(Blobs):
    """A store whose batch write fails (a full disk for a moment); one file at a time works."""

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        raise OSError(28, "No space left on device")


def test_a_failed_batch_write_leaves_each_mail_to_store_its_own(
    app: App, clock: Clock, tmp_path: Path
) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    kept = [os.urandom(3000) for _ in range(3)]
    for i, data in enumerate(kept):
        (folder / f"{i}.eml").write_bytes(with_attachment(f"gp{i}@practice.example", data))
    blobs = NoBatchBlobs(app.blobs.root)
    pipeline = Pipeline(app.records, app.spool, blobs, app.pipeline.p, app.pipeline.notifier, clock)
    assert files.run_import(pipeline, folder, lambda n: None, batch=3, workers=2)["created"] == 3
    for data in kept:
        assert app.blobs.read(sha(data)) == data


def test_a_streamed_attachment_syncs_its_directory_and_only_the_directories_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.store import files as store_files

    synced: list[str] = []
    monkeypatch.setattr(store_files, "fsync_dir", lambda d: synced.append(str(d)))
    blobs = Blobs(tmp_path / "attachments")
    first = "abcd" + "0" * 60
    blobs.put_chunks(first, iter([b"part one, ", b"part two"]))
    root = str(blobs.root)
    assert sorted(synced) == sorted([f"{root}/ab/cd", f"{root}/ab", root])  # two new levels
    assert blobs.read(first) == b"part one, part two"
    synced.clear()
    blobs.put_chunks("abcd" + "1" * 60, iter([b"another"]))  # same directories, existing now
    assert synced == [f"{root}/ab/cd"]
    assert not list(blobs.tmp.iterdir())


def test_directories_a_failed_write_made_are_synced_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first write into new directories fails after making them: the next write finds
    them in place, and must still make their entries durable."""
    from gateway.store import files as store_files

    synced: list[str] = []
    monkeypatch.setattr(store_files, "fsync_dir", lambda d: synced.append(str(d)))
    blobs = Blobs(tmp_path / "attachments")

    def broken() -> Iterator[bytes]:
        yield b"part one"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        blobs.put_chunks("efab" + "0" * 60, broken())
    assert synced == []
    blobs.put_chunks("efab" + "1" * 60, iter([b"the next one"]))
    root = str(blobs.root)
    assert sorted(synced) == sorted([f"{root}/ef/ab", f"{root}/ef", root])


def test_a_batch_whose_names_failed_to_sync_is_synced_before_it_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """put_many renamed the files into place but the sync of their names failed (the batch's
    mails then store their own): finding them in place is not enough, they are synced."""
    from gateway.store import files as store_files

    blobs = Blobs(tmp_path / "attachments")
    sha = hashlib.sha256(b"scan").hexdigest()
    real_sync = blobs._sync

    def names_fail(files: list[str], directories: list[str]) -> None:
        if directories:
            raise OSError(5, "Input/output error")
        real_sync(files, directories)

    monkeypatch.setattr(blobs, "_sync", names_fail)
    with pytest.raises(OSError):
        blobs.put_many([(sha, b"scan")])
    assert blobs.path(sha).exists()
    flushed: list[str] = []
    monkeypatch.setattr(store_files, "fsync_file", lambda p: flushed.append(str(p)))
    monkeypatch.setattr(store_files, "fsync_dir", lambda d: flushed.append(str(d)))
    blobs.put(sha, b"scan")
    assert flushed[:2] == [str(blobs.path(sha)), str(blobs.path(sha).parent)]
    flushed.clear()
    blobs.put(sha, b"scan")  # durable now: nothing more to do
    assert flushed == []
