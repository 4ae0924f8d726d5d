"""The local stack's GCS stand-in: gcp-storage-emulator, in memory, without its quadratic bookkeeping.

The emulator re-serializes the metadata of every object it holds (`json.dumps(..., indent=2)` into its
`.meta` record) after each write, so an upload costs time proportional to the objects already stored:
2.5 ms per upload at 500 objects, 45 ms at 3,000 and far more after a test session or a 2,000-wedding
backup (measured: `benchmarks` README section "The whole job"). In `--in-memory` mode that record is never
read again (only at start-up, when memory is empty), so this launcher skips it there and nothing else changes:
same server, same handlers, same answers. A disk-backed emulator keeps the stock behaviour.

It also honours `ifGenerationMatch` on uploads, which the stock emulator ignores: real GCS refuses (412) a
create-only upload (`ifGenerationMatch=0`) when the object exists, or a replacement when the object's
generation is not the one named. The GCS replica relies on that to write a new archive in one request.

And it parses an upload's `multipart/related` body (JSON metadata, then the bytes) by splitting it at its
boundary instead of through Python's `email` parser, which took about 70% of the emulator's time per upload
(measured: 1 MB uploads at ~33 MB/s); anything else, or a part with a transfer encoding, takes the stock path.

Run as `python -m wedbackup_dagster.dev.gcs_stand_in start --host H --port P --in-memory -q` (the
emulator's own arguments); `wedbackup stack up` does.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any


def skip_in_memory_metadata_rewrites() -> bool:
    """Patch the emulator's Storage; False (and the stock emulator) if its internals are not as expected."""
    from gcp_storage_emulator import storage

    original = getattr(storage.Storage, "_write_config_to_file", None)
    if original is None or getattr(original, "_wedbackup_patched", False):
        return original is not None

    def write_config_unless_in_memory(self: Any) -> None:
        if getattr(self, "_use_memory_fs", False):
            return
        original(self)

    write_config_unless_in_memory._wedbackup_patched = True  # type: ignore[attr-defined]
    storage.Storage._write_config_to_file = write_config_unless_in_memory
    return True


def _upload_name(request: Any) -> str | None:
    """The object an upload request names: `name` in the query, else in its JSON or multipart metadata."""
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else data
        name = meta.get("name")
        return name if isinstance(name, str) else None
    return None


def honour_if_generation_match() -> bool:
    """Patch the emulator's upload handler (before its server module takes a reference to it) to answer 412
    when `ifGenerationMatch` does not hold, as GCS does; False if its internals are not as expected."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original = getattr(objects, "insert", None)
    if original is None or getattr(original, "_wedbackup_patched", False):
        return original is not None

    def insert(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        wanted = request.query.get("ifGenerationMatch")
        if wanted and "upload_id" not in request.query:
            name = _upload_name(request)
            try:
                current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"]) if name else None
            except NotFound:
                current = None
            if (current or "0") != wanted[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                         "specified did not hold.", "errors": [{"reason": "conditionNotMet"}]}})
                return None
        return original(request, response, storage, *args, **kwargs)

    insert._wedbackup_patched = True  # type: ignore[attr-defined]
    objects.insert = insert
    return True


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def split_multipart_related(content_type: str, raw: bytes) -> dict[str, Any] | None:
    """The emulator's view of a one-request upload ({"meta", "content", "content-type"}), read by splitting at
    the boundary; None when the body is not the two plain parts an upload sends (the stock parser decides)."""
    found = _BOUNDARY.search(content_type)
    if not found:
        return None
    delimiter = b"--" + found.group(1).encode("latin-1")
    pieces = raw.split(delimiter)
    # preamble, two parts, and the closing "--" (plus any epilogue)
    if len(pieces) != 4 or not pieces[3].startswith(b"--"):
        return None
    parts = []
    for piece in pieces[1:3]:
        inner = piece[2:-2]
        if not piece.startswith(b"\r\n") or not piece.endswith(b"\r\n") or b"\r\n\r\n" not in inner:
            return None
        head, body = inner.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                return None
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if headers.get("content-transfer-encoding", "binary").lower() not in ("binary", "7bit", "8bit"):
            return None
        parts.append((headers, body))
    (meta_headers, meta), (content_headers, content) = parts
    if not meta_headers.get("content-type", "").lower().startswith("application/json"):
        return None
    media_type = content_headers.get("content-type", "text/plain").split(";", 1)[0].strip().lower()
    return {"meta": json.loads(meta), "content": content, "content-type": media_type or "text/plain"}


def parse_uploads_without_email_parser() -> bool:
    """Patch the emulator's body reader (server._read_data) for multipart/related uploads."""
    from gcp_storage_emulator import server

    original = getattr(server, "_read_data", None)
    if original is None or getattr(original, "_wedbackup_patched", False):
        return original is not None
    if not hasattr(server, "_read_raw_data") or not hasattr(server, "_decode_raw_data"):
        return False

    def read_data(request_handler: Any, query: Any) -> Any:
        content_type = request_handler.headers.get("Content-Type") or ""
        if not content_type.lower().startswith("multipart/related"):
            return original(request_handler, query)
        raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
        if not raw:
            return None
        parsed = split_multipart_related(content_type, raw)
        return parsed if parsed is not None else _stock_multipart_related(content_type, raw)

    read_data._wedbackup_patched = True  # type: ignore[attr-defined]
    server._read_data = read_data
    return True


def _stock_multipart_related(content_type: str, raw: bytes) -> dict[str, Any]:
    """What the stock reader makes of a multipart/related upload (the email parser)."""
    from email.parser import BytesParser

    payload = BytesParser().parsebytes(b"Content-Type:" + content_type.encode("latin-1") + b"\r\n" + raw).get_payload()
    return {"meta": json.loads(payload[0].get_payload()), "content": payload[1].get_payload(decode=True),
            "content-type": payload[1].get_content_type()}


def main(argv: list[str] | None = None) -> None:
    if not skip_in_memory_metadata_rewrites():
        print("gcs stand-in: gcp-storage-emulator's internals changed; running it unpatched "
              "(uploads slow down as objects accumulate)", file=sys.stderr)
    if not honour_if_generation_match():
        print("gcs stand-in: gcp-storage-emulator's upload handler changed; ifGenerationMatch is ignored",
              file=sys.stderr)
    if not parse_uploads_without_email_parser():
        print("gcs stand-in: gcp-storage-emulator's body reader changed; uploads use its email parser",
              file=sys.stderr)
    from gcp_storage_emulator.__main__ import main as emulator_main

    emulator_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
