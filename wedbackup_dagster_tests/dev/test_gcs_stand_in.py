"""The GCS stand-in's launcher: in memory it skips the emulator's rewrite of all metadata, and keeps every
object and its metadata; on disk the emulator is unchanged. Pure: the emulator's Storage, no server. It also
answers 412 to an upload whose ifGenerationMatch does not hold, as GCS does (tested on the stack's server, which
`wedbackup stack up` starts with this launcher)."""
from __future__ import annotations

from gcp_storage_emulator.storage import Storage

import pytest

from wedbackup_dagster.dev.gcs_stand_in import (_stock_multipart_related, skip_in_memory_metadata_rewrites,
                                                split_multipart_related)


def _store_objects(storage: Storage, count: int) -> None:
    storage.create_bucket("b", {"name": "b"})
    for i in range(count):
        storage.create_file("b", f"weddings/{i}/a.wbk", f"archive {i}".encode(), {"name": f"weddings/{i}/a.wbk", "size": 9})


def test_in_memory_emulator_no_longer_serializes_every_object_on_each_write(tmp_path):
    assert skip_in_memory_metadata_rewrites()
    assert skip_in_memory_metadata_rewrites()  # a second call does not wrap the patch again
    storage = Storage(use_memory_fs=True, data_dir=str(tmp_path))
    _store_objects(storage, 50)
    assert not storage._store.exists_file(".meta")
    for i in (0, 49):
        assert storage.get_file("b", f"weddings/{i}/a.wbk") == f"archive {i}".encode()
        assert storage.get_file_obj("b", f"weddings/{i}/a.wbk")["name"] == f"weddings/{i}/a.wbk"
    storage.delete_file("b", "weddings/0/a.wbk")
    assert "weddings/0/a.wbk" not in storage.objects["b"]
    assert storage.get_file("b", "weddings/1/a.wbk") == b"archive 1"


def test_disk_backed_emulator_still_keeps_its_metadata_record(tmp_path):
    skip_in_memory_metadata_rewrites()
    storage = Storage(use_memory_fs=False, data_dir=str(tmp_path))
    _store_objects(storage, 3)
    reopened = Storage(use_memory_fs=False, data_dir=str(tmp_path))
    assert reopened.get_file_obj("b", "weddings/2/a.wbk")["name"] == "weddings/2/a.wbk"


def test_stack_emulator_refuses_uploads_whose_generation_precondition_fails(stack, gcs_client, gcs_bucket):
    from google.api_core.exceptions import PreconditionFailed

    bucket = gcs_client.bucket(gcs_bucket)
    for upload in (lambda blob, **k: blob.upload_from_string(b"first", **k),  # multipart: metadata + body
                   lambda blob, **k: blob.upload_from_file(__import__("io").BytesIO(b"x" * (3 << 20)),
                                                           size=3 << 20, **k)):  # resumable session
        blob = bucket.blob(f"weddings/7/{__import__('uuid').uuid4().hex}.wbk", chunk_size=1 << 20)
        upload(blob, if_generation_match=0)
        first = bucket.get_blob(blob.name).generation
        with pytest.raises(PreconditionFailed):
            upload(bucket.blob(blob.name, chunk_size=1 << 20), if_generation_match=0)  # create-only: it exists
        with pytest.raises(PreconditionFailed):
            upload(bucket.blob(blob.name, chunk_size=1 << 20), if_generation_match=first + 1)  # not its generation
        assert bucket.get_blob(blob.name).generation == first
        upload(bucket.blob(blob.name, chunk_size=1 << 20), if_generation_match=first)  # exactly that generation
        assert bucket.get_blob(blob.name).generation != first


@pytest.mark.parametrize("data", [b"", b"plain", b"ab\r\n--x\r\n\r\ncd\r\n", bytes(range(256)) * 40])
def test_upload_bodies_split_at_the_boundary_read_as_the_email_parser_reads_them(data):
    from google.resumable_media._upload import construct_multipart_request

    body, boundary = construct_multipart_request(data, {"name": "weddings/7/a.wbk", "metadata": {"sha256": "ab"}},
                                                 "application/octet-stream")
    content_type = f'multipart/related; boundary="{boundary.decode()}"'
    fast = split_multipart_related(content_type, body)
    assert fast == _stock_multipart_related(content_type, body)
    assert fast["content"] == data and fast["meta"]["name"] == "weddings/7/a.wbk"


def test_bodies_that_are_not_a_plain_upload_are_left_to_the_email_parser():
    body = (b"--b\r\ncontent-type: application/json\r\n\r\n{}\r\n--b\r\ncontent-type: text/plain\r\n"
            b"content-transfer-encoding: base64\r\n\r\naGk=\r\n--b--")
    assert split_multipart_related('multipart/related; boundary="b"', body) is None
    assert split_multipart_related("multipart/related", body) is None  # no boundary
    assert split_multipart_related('multipart/related; boundary="b"', body.replace(b"--b--", b"")) is None
