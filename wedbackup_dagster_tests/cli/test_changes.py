"""`wedbackup changes …` and `wedbackup restore --as-of` to a second, through the command line and Dagster's
restore_wedding job, on the real stack."""
from __future__ import annotations

import json
import time

import psycopg

from wedbackup_dagster.cli.app import main
from wedbackup_dagster_tests.core.changefeed.conftest import digest, drop_test_slots
from wedbackup_dagster_tests.cli.test_app import cli_env  # noqa: F401  (a fixture)


def test_check_start_drain_status_and_restore_to_a_second(cli_env, make_database, capsys, monkeypatch):  # noqa: F811
    source = cli_env["source"]
    slot = f"wbt_cli_{int(time.time() * 1000) % 10**9}"
    monkeypatch.setenv("WEDBACKUP_CHANGEFEED_SLOT", slot)
    try:
        assert main(["changes", "check"]) == 0
        assert "change feed source check: ready" in capsys.readouterr().out
        assert main(["changes", "start"]) == 0
        assert json.loads(capsys.readouterr().out)["slot"] == slot
        assert main(["backup", "--wedding", "2"]) == 0
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("DELETE FROM guest_dietary WHERE guest_id IN (SELECT id FROM guests WHERE wedding_id = 2)")
            conn.execute("UPDATE guests SET meal_choice = 'vegan' WHERE wedding_id = 2")
            (at,) = conn.execute("SELECT clock_timestamp()").fetchone()
            expected = digest(conn, "2")
            time.sleep(0.01)
            conn.execute("UPDATE weddings SET title = 'later' WHERE id = 2")
        capsys.readouterr()
        assert main(["changes", "drain", "--json"]) == 0
        drained = json.loads(capsys.readouterr().out)
        assert drained["changes"] > 0 and "2" in drained["segments"]
        assert main(["changes", "replicate"]) == 0
        assert "s3: 1 segment(s) uploaded" in capsys.readouterr().out
        assert main(["changes", "status"]) == 0
        shown = capsys.readouterr().out
        assert f"slot {slot}: reserved" in shown and "captured up to" in shown
        assert main(["points", "--wedding", "2"]) == 0
        assert "+ change feed: any second from" in capsys.readouterr().out
        target = make_database()
        assert main(["restore", "--wedding", "2", "--as-of", at.isoformat(), "--target-dsn", target]) == 0
        assert digest(target, "2") == expected
        # Past what was captured: refused, naming the range.
        assert main(["restore", "--wedding", "2", "--as-of", "2999-01-01T00:00:00+00:00",
                     "--target-dsn", make_database()]) != 0
        assert "nearest restorable points" in capsys.readouterr().err
        assert main(["changes", "stop"]) == 0
    finally:
        drop_test_slots(source, [slot])
