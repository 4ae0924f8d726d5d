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

Run as `python -m wedbackup_dagster.dev.gcs_stand_in start --host H --port P --in-memory -q` (the
emulator's own arguments); `wedbackup stack up` does.
"""
from __future__ import annotations

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


def main(argv: list[str] | None = None) -> None:
    if not skip_in_memory_metadata_rewrites():
        print("gcs stand-in: gcp-storage-emulator's internals changed; running it unpatched "
              "(uploads slow down as objects accumulate)", file=sys.stderr)
    if not honour_if_generation_match():
        print("gcs stand-in: gcp-storage-emulator's upload handler changed; ifGenerationMatch is ignored",
              file=sys.stderr)
    from gcp_storage_emulator.__main__ import main as emulator_main

    emulator_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
