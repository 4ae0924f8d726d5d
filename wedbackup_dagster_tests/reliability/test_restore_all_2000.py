"""issue 17's "Done when" at full size (`make reliability`: minutes, not for `make test`): a 2,000-wedding demo
database backed up, copied to S3 and verified, then the source dropped and the vault deleted; `restore --all
--from s3` brings it back with every table exactly equal to the source (per-table counts and ordered
checksums); and the same after a catalogue loss too (a new catalogue rebuilt from S3 alone, wedding keys from
the key-store backup). The demo-sized version runs in `make test` (core/disaster/test_restore_all.py)."""
from __future__ import annotations

import dataclasses
import os
import shutil

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from benchmarks.restore_all import back_up_to_s3
from wedbackup_dagster.dev.compare import table_sums
from wedbackup_dagster.core import disaster
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.catalogue.rebuild_from_storage import rebuild_from
from wedbackup_dagster.core.storage.replicas import S3Replica
from wedbackup_dagster.core.storage.providers import ensure_targets
from wedbackup_dagster.core.storage.replicas.s3 import s3_client_from

pytestmark = [pytest.mark.stack, pytest.mark.reliability]

WEDDINGS = int(os.environ.get("WEDBACKUP_RESTORE_ALL_WEDDINGS", "2000"))


@pytest.mark.timeout(3600)  # about 10 min per restore here, on a shared 2-core machine
def test_2000_weddings_back_from_s3_alone_equal_the_source_also_after_a_catalogue_loss(demo_env, stack,
                                                                                       make_database):
    dsns = demo_env(weddings=WEDDINGS, seed=7, document_bytes=4096)
    engine = Engine.from_env()
    try:
        ensure_targets(engine.settings)
        s3 = S3Replica(s3_client_from(engine.settings.s3, os.environ), engine.settings.s3)
        with psycopg.connect(dsns["source"]) as conn:
            ids = [str(r[0]) for r in conn.execute("SELECT id FROM weddings ORDER BY id")]
        assert len(ids) == WEDDINGS
        back_up_to_s3(engine, s3, ["platform", *ids])
        expected = table_sums(dsns["source"])
        name = conninfo_to_dict(dsns["source"])["dbname"]
        with psycopg.connect(stack.dsn("postgres"), autocommit=True) as conn:  # the disaster
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        shutil.rmtree(engine.settings.vault_dir)

        target = make_database()
        report = disaster.restore_all(engine, {"s3": s3}, target,
                                      disaster.RestoreAllOptions(providers=("s3",), jobs=4))
        assert report.complete, report.lines()
        print("\n".join(report.lines()))  # the figures, with -s
        assert report.restored_now == WEDDINGS + 1 and report.copies_used == {"s3": WEDDINGS + 1}
        assert table_sums(target) == expected

        # The catalogue lost as well: a new one from S3 alone, then the newest backups (unverified there).
        fresh = Engine(dataclasses.replace(engine.settings, catalogue_dsn=make_database()), engine.keyring)
        try:
            rebuilt = rebuild_from(s3, fresh.catalogue, fresh.keyring)
            assert rebuilt.backups_added == WEDDINGS + 1 and rebuilt.keys_restored == WEDDINGS + 1
            again = make_database()
            report = disaster.restore_all(fresh, {"s3": s3}, again, disaster.RestoreAllOptions(
                providers=("s3",), jobs=4, include_unverified=True))
            assert report.complete, report.lines()
            assert table_sums(again) == expected
        finally:
            fresh.catalogue.close()
    finally:
        engine.catalogue.close()
