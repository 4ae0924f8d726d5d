"""The key-backup advisory lock survives a reopened catalogue connection (issue 14, defect 10): the work
re-takes it on the connection it runs on, or stops naming the lock when another run took it meanwhile."""
from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from wedbackup_dagster.core.catalogue.store import Catalogue
from wedbackup_dagster.core.errors import KeyBackupError
from wedbackup_dagster.core.keys.backup import _one_at_a_time, back_up_key_store
from wedbackup_dagster_tests.core.keys.test_backup import back_up, engine, replicas_of  # noqa: F401 - fixture

LOCK = "SELECT pg_try_advisory_lock(hashtext('wedbackup-key-backups'))"


def drop_connection(catalogue: Catalogue) -> None:
    """The server ends the catalogue's session (an idle timeout, a failover); the catalogue notices."""
    with catalogue.connect() as conn:
        pid = conn.info.backend_pid
    with psycopg.connect(catalogue.dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        with catalogue.connect() as conn:
            conn.execute("SELECT 1")


def test_a_reopened_connection_retakes_the_key_backup_lock(engine):
    replicas = replicas_of(engine)
    back_up(engine, ["1"], replicas)
    catalogue = Catalogue(engine.settings.catalogue_dsn)
    with psycopg.connect(catalogue.dsn, autocommit=True) as other:
        with _one_at_a_time(catalogue):  # as refresh_key_backups holds it around back_up_key_store
            drop_connection(catalogue)
            result = back_up_key_store(engine.settings, catalogue, replicas, engine.keyring)
            assert result.ok
            # Still inside the outer section: no other run may take the lock now.
            assert other.execute(LOCK).fetchone()[0] is False, "the key-backup lock was lost with the connection"
        assert other.execute(LOCK).fetchone()[0] is True  # released at the end
        other.execute("SELECT pg_advisory_unlock(hashtext('wedbackup-key-backups'))")


def test_a_lock_taken_by_another_run_meanwhile_stops_the_work_by_name(engine):
    replicas = replicas_of(engine)
    back_up(engine, ["1"], replicas)
    # A bounded lock wait, so the code before the fix (which waited for the lock afresh) fails, not hangs.
    catalogue = Catalogue(make_conninfo(engine.settings.catalogue_dsn, options="-c lock_timeout=3000"))
    with psycopg.connect(catalogue.dsn, autocommit=True) as other:
        with _one_at_a_time(catalogue):
            drop_connection(catalogue)
            assert other.execute(LOCK).fetchone()[0] is True  # another run gets in while we reconnect
            with pytest.raises(KeyBackupError, match="key backup lock: was lost .* another run holds it"):
                back_up_key_store(engine.settings, catalogue, replicas, engine.keyring)
        with catalogue.connect() as conn:
            assert conn.execute("SELECT count(*) AS n FROM wedbackup.key_backups").fetchone()["n"] == 0
