"""The pooled PostgreSQL event log: a run's events are stored (and readable) as with dagster-postgres,
over a connection the storage keeps instead of one new connection per write."""
import dagster as dg
import sqlalchemy

from wedbackup_dagster.instance.storage import MAX_OVERFLOW, POOL_SIZE, PooledPostgresEventLogStorage


@dg.op
def many_materializations():
    for i in range(20):
        yield dg.AssetMaterialization("pooled_probe", metadata={"i": i})
    yield dg.Output(None)


@dg.job
def probe_job():
    many_materializations()


def test_events_are_stored_over_a_kept_connection(tmp_path, make_database, monkeypatch):
    # The URL comes from the environment, as in a deployment: a password never lands in dagster.yaml.
    monkeypatch.setenv("WEDBACKUP_TEST_DAGSTER_PG_URL", make_database())
    url = "{env: WEDBACKUP_TEST_DAGSTER_PG_URL}"
    (tmp_path / "dagster.yaml").write_text(
        "run_storage:\n  module: dagster_postgres.run_storage\n  class: PostgresRunStorage\n"
        f"  config:\n    postgres_url: {url}\n"
        "event_log_storage:\n  module: wedbackup_dagster.instance.storage\n  class: PooledPostgresEventLogStorage\n"
        f"  config:\n    postgres_url: {url}\n")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        storage = instance.event_log_storage
        assert isinstance(storage, PooledPostgresEventLogStorage)
        opened = []
        sqlalchemy.event.listen(storage._engine, "connect", lambda *_: opened.append(1))
        result = probe_job.execute_in_process(instance=instance)
        assert result.success
        # 20 materializations plus the step's events: with a new connection per write this is ~60.
        assert 0 < len(opened) <= POOL_SIZE + MAX_OVERFLOW
        latest = instance.get_latest_materialization_event(dg.AssetKey("pooled_probe"))
        assert latest.asset_materialization.metadata["i"].value == 19
        assert len(instance.fetch_materializations(dg.AssetKey("pooled_probe"), limit=100).records) == 20
    finally:
        instance.dispose()
