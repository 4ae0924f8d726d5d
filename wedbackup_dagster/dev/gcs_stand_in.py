"""The local stack's GCS stand-in: gcp-storage-emulator, in memory, without its quadratic bookkeeping.

The emulator re-serializes the metadata of every object it holds (`json.dumps(..., indent=2)` into its
`.meta` record) after each write, so an upload costs time proportional to the objects already stored:
2.5 ms per upload at 500 objects, 45 ms at 3,000 and far more after a test session or a 2,000-wedding
backup (measured: `benchmarks` README section "The whole job"). In `--in-memory` mode that record is never
read again (only at start-up, when memory is empty), so this launcher skips it there and nothing else changes:
same server, same handlers, same answers. A disk-backed emulator keeps the stock behaviour.

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


def main(argv: list[str] | None = None) -> None:
    from gcp_storage_emulator.__main__ import main as emulator_main

    if not skip_in_memory_metadata_rewrites():
        print("gcs stand-in: gcp-storage-emulator's internals changed; running it unpatched "
              "(uploads slow down as objects accumulate)", file=sys.stderr)
    emulator_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
