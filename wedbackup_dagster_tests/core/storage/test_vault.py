"""The vault writes atomically under content addresses and never lets a partition escape its folder."""
from __future__ import annotations

import hashlib

import pytest

from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.core.storage.vault import Vault


def _write(vault: Vault, partition: str, data: bytes):
    with vault.incoming(partition) as (fh, tmp):
        fh.write(data)
        return vault.commit(fh, tmp, partition, hashlib.sha256(data).hexdigest())


def test_commit_renames_to_content_address(tmp_path):
    vault = Vault(tmp_path)
    entry = _write(vault, "42", b"sealed bytes")
    assert entry.path == tmp_path / "42" / f"{hashlib.sha256(b'sealed bytes').hexdigest()}.wbk"
    assert entry.path.read_bytes() == b"sealed bytes"
    assert list((tmp_path / "42").glob(".incoming-*")) == []
    assert [e.sha256 for e in vault.entries("42")] == [entry.sha256]


def test_failure_before_commit_leaves_nothing(tmp_path):
    vault = Vault(tmp_path)
    with pytest.raises(RuntimeError):
        with vault.incoming("42") as (fh, _tmp):
            fh.write(b"half an archive")
            raise RuntimeError("killed mid-dump")
    assert list((tmp_path / "42").iterdir()) == []


def test_recommitting_same_content_keeps_the_original(tmp_path):
    vault = Vault(tmp_path)
    first = _write(vault, "7", b"abc")
    inode = first.path.stat().st_ino
    second = _write(vault, "7", b"abc")
    assert second.path == first.path and first.path.stat().st_ino == inode


def test_leftover_incoming_files_are_cleaned(tmp_path):
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / ".incoming-dead").write_bytes(b"x")
    assert Vault(tmp_path).clean_incoming() == 1


@pytest.mark.parametrize("partition", ["../etc", "a/b", "", "x" * 65, "42;rm -rf /", ".."])
def test_hostile_partition_rejected(tmp_path, partition):
    with pytest.raises(WedbackupError):
        Vault(tmp_path).path_for(partition, "0" * 64)


@pytest.mark.parametrize("sha", ["../" + "0" * 61, "A" * 64, "0" * 63])
def test_hostile_sha_rejected(tmp_path, sha):
    with pytest.raises(WedbackupError):
        Vault(tmp_path).path_for("42", sha)


def test_cleaning_spares_a_temp_file_a_live_writer_holds(tmp_path):
    vault = Vault(tmp_path)
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / ".incoming-dead").write_bytes(b"x")
    with vault.incoming("9") as (fh, tmp):
        fh.write(b"being written")
        assert vault.clean_incoming("9") == 1  # only the abandoned one
        assert tmp.exists()
