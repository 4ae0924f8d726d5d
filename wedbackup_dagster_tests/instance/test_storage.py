"""The pooled PostgreSQL event log: a run's events are stored (and readable) as with dagster-postgres,
over a connection the storage keeps instead of one new connection per write."""
import contextlib

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




def test_the_asset_tags_table_is_looked_up_once_not_on_a_new_connection_per_batch(tmp_path, make_database,
                                                                                  monkeypatch):
    """Dagster asks before each batch of asset events whether `asset_event_tags` exists, on a second
    connection (an overflow one, opened and closed each time): asked once, the answer kept; the tags
    (each materialization's data version) are stored for every batch as before."""
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "5")
    monkeypatch.setenv("WEDBACKUP_TEST_BATCH_PG_URL", make_database())
    instance = _instance(tmp_path, "", pooled=True)
    try:
        storage = instance.event_log_storage
        dialect = storage._engine.dialect
        asked = []
        original = dialect.has_table
        monkeypatch.setattr(dialect, "has_table", lambda conn, name, *a, **k: asked.append(name) or original(
            conn, name, *a, **k))
        _run_range(instance)  # 12 weddings: three batches of materializations
        assert asked.count("asset_event_tags") <= 1
        assert storage._writer is None  # a small run's batches: written here, no helper process started
        records = instance.fetch_materializations(batch_probe.key, limit=100).records
        assert sorted(r.partition_key for r in records) == PROBE_WEDDINGS.get_partition_keys()
        tags = storage.get_event_tags_for_asset(batch_probe.key)
        assert len(tags) == 12 and all("dagster/data_version" in t for t in tags)
        assert storage.has_table("asset_event_tags") and not storage.has_table("no_such_table")
        assert not storage.has_table("no_such_table")
        assert asked.count("no_such_table") == 2  # a missing table is asked about again
    finally:
        instance.dispose()

# ------------------------------------------------- per-wedding events stored in one transaction a batch

PROBE_WEDDINGS = dg.StaticPartitionsDefinition([f"w{i:02d}" for i in range(12)])
FAILING = {"w03", "w07"}


@dg.asset(partitions_def=PROBE_WEDDINGS)
def batch_probe(context: dg.AssetExecutionContext) -> None:
    return None


def _probe_check(name: str, *, blocking: bool):
    @dg.asset_check(asset=batch_probe, name=name, partitions_def=PROBE_WEDDINGS, blocking=blocking)
    def probe_check(context: dg.AssetCheckExecutionContext):
        from wedbackup_dagster.instance.event_batches import check_evaluations_in_batches

        evaluations = [dg.AssetCheckEvaluation(asset_key=batch_probe.key, check_name=name, partition=key,
                                               passed=key not in FAILING, description=f"wedding {key}",
                                               metadata={"wedding": key}, blocking=blocking)
                       for key in context.partition_keys]
        yield from check_evaluations_in_batches(context, evaluations, size=5)
        yield dg.Output(None)
    return probe_check


probe_checks = [_probe_check("soft_probe", blocking=False), _probe_check("blocking_probe", blocking=True)]
range_job = dg.define_asset_job("batch_probe_range", selection=dg.AssetSelection.assets(batch_probe)
                                | dg.AssetSelection.checks(*probe_checks))
probe_defs = dg.Definitions(assets=[batch_probe], asset_checks=probe_checks, jobs=[range_job])


def _instance(tmp_path, url: str, *, pooled: bool):
    home = tmp_path / ("pooled" if pooled else "stock")
    home.mkdir()
    storage = ("storage:\n  custom:\n    module: wedbackup_dagster.instance.storage\n    class: LocalStackStorage\n"
               "    config:\n      postgres_url_env: WEDBACKUP_TEST_BATCH_PG_URL\n" if pooled else
               "storage:\n  postgres:\n    postgres_url: {env: WEDBACKUP_TEST_STOCK_PG_URL}\n")
    (home / "dagster.yaml").write_text(storage + "telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.from_config(str(home))


def _run_range(instance):
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    job = probe_defs.resolve_job_def("batch_probe_range")
    return job.execute_in_process(instance=instance, raise_on_error=False, tags={
        ASSET_PARTITION_RANGE_START_TAG: "w00", ASSET_PARTITION_RANGE_END_TAG: "w11"})


def _what_the_ui_shows(instance, run_id):
    """Per check and wedding partition: the execution's status, and its evaluation's words and metadata."""
    from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable

    with instance.event_log_storage.index_connection() as conn:
        rows = conn.execute(sqlalchemy.select(
            AssetCheckExecutionsTable.c.check_name, AssetCheckExecutionsTable.c.partition,
            AssetCheckExecutionsTable.c.execution_status, AssetCheckExecutionsTable.c.evaluation_event,
        ).where(AssetCheckExecutionsTable.c.run_id == run_id)).fetchall()
    from dagster._serdes import deserialize_value

    shown = {}
    for name, partition, status, event in rows:
        evaluation = deserialize_value(event).get_dagster_event().event_specific_data
        detail = (evaluation.description, evaluation.metadata["wedding"].value) if hasattr(evaluation, "passed") \
            else None
        shown[(name, partition)] = (status, detail)
    return shown, _planned_weddings(instance, run_id)


def _planned_weddings(instance, run_id):
    """The weddings the run's planned materializations name: one event per wedding, or one naming them all."""
    planned = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
                                           limit=1000).records
    weddings = []
    for record in planned:
        data = record.event_log_entry.dagster_event.event_specific_data
        weddings += data.partitions_subset.get_partition_keys() if data.partitions_subset else [data.partition]
    return sorted(weddings)


@contextlib.contextmanager
def _pooled_beside_stock(tmp_path, make_database, monkeypatch, batch_size: int, *, behind: bool = False,
                         stock_plans_ranges: bool = True):
    """Our pooled event log and stock dagster-postgres, each an instance on its own database, with Dagster's
    event batches of `batch_size`; yields (pooled, stock, batches), `batches` recording each batch the pooled
    storage writes in one transaction as (its event types, its size). Unless `behind`, the pooled storage
    writes its batches in this process (so the spies here see them), not by its helper process. Ours plans a
    range run with one event per asset; so does stock if `stock_plans_ranges` (Dagster's own switch), so that
    the two logs can be compared event by event; otherwise stock plans one event per wedding, as by default."""
    from wedbackup_dagster.instance.event_batches import BATCH_SIZE_SETTING

    monkeypatch.setenv(BATCH_SIZE_SETTING, str(batch_size))
    if stock_plans_ranges:
        monkeypatch.setenv("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "true")
    monkeypatch.setenv("WEDBACKUP_TEST_BATCH_PG_URL", make_database())
    monkeypatch.setenv("WEDBACKUP_TEST_STOCK_PG_URL", make_database())
    pooled, stock = _instance(tmp_path, "", pooled=True), _instance(tmp_path, "", pooled=False)
    try:
        storage = pooled.event_log_storage
        assert isinstance(storage, PooledPostgresEventLogStorage)
        storage._writes_behind = behind
        storage._write_behind_after = 0  # from the first batch (by default past the first 1,000 events)
        if behind:  # the helper started and ready before the run (it starts in the background on first use)
            storage._start_helper()
            storage._starting.join(60)
            assert storage._writer is not None
        batches: list[tuple[set, int]] = []
        original = storage._store_in_one_transaction

        def spy(events):
            batches.append(({e.dagster_event_type for e in events}, len(events)))
            return original(events)

        monkeypatch.setattr(storage, "_store_in_one_transaction", spy)
        yield pooled, stock, batches
    finally:
        pooled.dispose()
        stock.dispose()


def test_a_range_runs_planned_events_and_check_evaluations_are_stored_in_batches_as_dagster_stores_them(
        tmp_path, make_database, monkeypatch):
    with _pooled_beside_stock(tmp_path, make_database, monkeypatch, 100) as (pooled, stock, batches):
        storage = pooled.event_log_storage
        left_to_dagster: list[int] = []
        update = storage._update_check_evaluations

        def update_spy(conn, events, *serialized):
            left = update(conn, events, *serialized)
            left_to_dagster.extend(1 for e, _ in left
                                   if e.dagster_event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION)
            return left

        monkeypatch.setattr(storage, "_update_check_evaluations", update_spy)
        from wedbackup_dagster.instance import storage as storage_module

        serialized_again: list[int] = []
        serialize = storage_module.serialize_value
        monkeypatch.setattr(storage_module, "serialize_value", lambda value, *a, **k: serialized_again.append(
            value.dagster_event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION) or serialize(value, *a, **k))
        ours, theirs = _run_range(pooled), _run_range(stock)
        # Every batched evaluation set its planned row with the batch's UPDATE, none one by one, holding the
        # JSON its event row was stored with (serialized once: the rows below equal stock dagster-postgres's).
        assert not left_to_dagster
        assert not any(serialized_again)
        # Both fail the same way: the blocking check's two failed weddings fail its step.
        assert not ours.success and not theirs.success
        failed_steps = lambda r: sorted(e.step_key for e in r.all_events if e.event_type_value == "STEP_FAILURE")
        assert failed_steps(ours) == failed_steps(theirs) == ["batch_probe_blocking_probe"]
        # What the UI reads per check and wedding partition is the same as on stock dagster-postgres.
        shown, planned = _what_the_ui_shows(pooled, ours.run_id)
        assert (shown, planned) == _what_the_ui_shows(stock, theirs.run_id)
        assert planned == sorted(PROBE_WEDDINGS.get_partition_keys())
        assert len(shown) == 24
        assert shown[("soft_probe", "w03")] == ("FAILED", ("wedding w03", "w03"))
        assert shown[("soft_probe", "w04")] == ("SUCCEEDED", ("wedding w04", "w04"))
        assert shown[("blocking_probe", "w07")][0] == "FAILED"
        # ... written in batches: the planned events at run creation (one for the asset, one per check, each
        # naming the run's weddings), and the evaluations in groups of five (the blocking check's failures go
        # through Dagster's own path, one by one, so they fail the step).
        assert any(types == {dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED} | {
            dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED} and n == 3 for types, n in batches), batches
        evaluation_batches = sorted(n for types, n in batches if types == {dg.DagsterEventType.ASSET_CHECK_EVALUATION})
        # soft_probe: 12 in 5 + 5 + 2; blocking_probe: its 10 passes in 5 + 5, its 2 failures alone.
        assert evaluation_batches == [2, 5, 5, 5, 5], batches


def test_a_failed_batch_leaves_nothing_behind_and_dagster_stores_its_events_one_by_one(
        tmp_path, make_database, monkeypatch):
    with _pooled_beside_stock(tmp_path, make_database, monkeypatch, 100) as (pooled, stock, _):
        storage = pooled.event_log_storage
        original = storage._update_check_evaluations
        calls = []

        def fail_late(conn, events, *serialized):
            # Fails after the batch's event rows and asset index were written in its transaction: the first
            # call stores the run's planned checks, the second a batch of evaluations.
            calls.append(len(events))
            if len(calls) == 2:
                original(conn, events, *serialized)  # its UPDATE ran, and is rolled back with the rest
                raise RuntimeError("index write failed")
            return original(conn, events, *serialized)

        monkeypatch.setattr(storage, "_update_check_evaluations", fail_late)
        ours, theirs = _run_range(pooled), _run_range(stock)
        shown, planned = _what_the_ui_shows(pooled, ours.run_id)
        assert (shown, planned) == _what_the_ui_shows(stock, theirs.run_id)
        # No event twice: every wedding's evaluation of each check is in the run's log once.
        evaluations = pooled.get_records_for_run(ours.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION,
                                                 limit=1000).records
        keys = [(r.event_log_entry.dagster_event.event_specific_data.check_name,
                 r.event_log_entry.dagster_event.event_specific_data.partition) for r in evaluations]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 24
        assert len(calls) >= 2  # the failure was injected


def test_a_range_runs_materializations_are_stored_a_batch_per_transaction_as_dagster_stores_them(
        tmp_path, make_database, monkeypatch):
    """The output of a range step (one materialization per wedding, buffered by Dagster in batches) goes
    through the one-transaction path: the same materializations, the same latest one and asset tags per event
    as stock dagster-postgres, each event's row holding that event (ids returned in the rows' order)."""
    with _pooled_beside_stock(tmp_path, make_database, monkeypatch, 5) as (pooled, stock, batches):
        ours, theirs = _run_range(pooled), _run_range(stock)
        assert sorted(n for types, n in batches if types == {dg.DagsterEventType.ASSET_MATERIALIZATION}) == [2, 5, 5]

        def shown(instance, run_id):
            records = instance.fetch_materializations(batch_probe.key, limit=100).records
            latest = instance.get_latest_materialization_event(batch_probe.key)
            tags = instance.event_log_storage.get_event_tags_for_asset(batch_probe.key)
            # Each stored row's partition column is the partition inside the event that id was returned for.
            rows = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION,
                                                limit=100).records
            with instance.event_log_storage.index_connection() as conn:
                columns = dict(conn.execute(sqlalchemy.text(
                    "SELECT id, partition FROM event_logs WHERE run_id = :run AND dagster_event_type = "
                    "'ASSET_MATERIALIZATION'"), {"run": run_id}).fetchall())
            assert {r.storage_id: r.event_log_entry.dagster_event.partition for r in rows} == columns
            # (a data version is the run's own: its tag's name per event is compared, not its value)
            return (sorted(r.partition_key for r in records), latest.dagster_event.partition,
                    sorted(sorted(t) for t in tags))

        assert shown(pooled, ours.run_id) == shown(stock, theirs.run_id)
        assert shown(pooled, ours.run_id)[0] == PROBE_WEDDINGS.get_partition_keys()


@dg.asset(partitions_def=PROBE_WEDDINGS)
def partly_failing_probe(context: dg.AssetExecutionContext):
    """A range step as ours are: each wedding that succeeded recorded on its own, then the step fails naming
    the rest."""
    for key in context.partition_keys:
        if key not in FAILING:
            yield dg.AssetMaterialization(asset_key=context.asset_key, partition=key)
    raise dg.Failure(description=f"failed for {sorted(FAILING)}")


def _status_the_ui_shows(instance, asset_key):
    """The asset's per-wedding status as the UI reads it (Dagster's asset status cache, made afresh)."""
    from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

    value = get_and_update_asset_status_cache_value(instance, asset_key, PROBE_WEDDINGS)
    return {status: sorted(subset.get_partition_keys()) for status, subset in (
        ("materialized", value.deserialize_materialized_partition_subsets(PROBE_WEDDINGS)),
        ("failed", value.deserialize_failed_partition_subsets(PROBE_WEDDINGS)),
        ("in progress", value.deserialize_in_progress_partition_subsets(PROBE_WEDDINGS)))}


def test_a_range_run_is_planned_in_one_event_per_asset_and_the_ui_shows_each_weddings_status_as_before(
        tmp_path, make_database, monkeypatch):
    """Our storage plans a range run with one event per asset naming its weddings (stock dagster-postgres, as by
    default here: one event per wedding). What the UI shows per wedding is the same: a run not yet finished
    shows its weddings in progress; a failed run's weddings that were not materialized show as failed, the
    others as materialized; a later materialization of a failed wedding clears it."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    defs = dg.Definitions(assets=[partly_failing_probe, batch_probe])
    job = dg.define_asset_job("partly_failing", selection=[partly_failing_probe]).resolve(
        asset_graph=defs.resolve_asset_graph())
    tags = {ASSET_PARTITION_RANGE_START_TAG: "w00", ASSET_PARTITION_RANGE_END_TAG: "w11"}
    with _pooled_beside_stock(tmp_path, make_database, monkeypatch, 5, stock_plans_ranges=False) as (
            pooled, stock, _):
        key = partly_failing_probe.key
        for instance in (pooled, stock):
            instance.create_run_for_job(job, tags=tags)  # created, not launched: its weddings are in progress
        assert _status_the_ui_shows(pooled, key) == _status_the_ui_shows(stock, key) == {
            "materialized": [], "failed": [], "in progress": PROBE_WEDDINGS.get_partition_keys()}
        planned = lambda instance: instance.fetch_planned_materializations(key, limit=100).records
        assert len(planned(pooled)) == 1 and len(planned(stock)) == 12  # one naming the 12 weddings; 12
        for instance in (pooled, stock):
            for run in instance.get_runs():
                instance.delete_run(run.run_id)
        ours = job.execute_in_process(instance=pooled, raise_on_error=False, tags=tags)
        theirs = job.execute_in_process(instance=stock, raise_on_error=False, tags=tags)
        assert not ours.success and not theirs.success
        shown = _status_the_ui_shows(pooled, key)
        assert shown == _status_the_ui_shows(stock, key)
        assert shown["failed"] == sorted(FAILING) and shown["in progress"] == []
        assert shown["materialized"] == sorted(set(PROBE_WEDDINGS.get_partition_keys()) - FAILING)
        for instance in (pooled, stock):  # w03 materialized later: it is failed no more
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition="w03"))
        shown = _status_the_ui_shows(pooled, key)
        assert shown == _status_the_ui_shows(stock, key) and shown["failed"] == ["w07"]


# ------------------------------------------------- batches written behind by the helper process


def _run_log(instance, run_id):
    """The run's log as (event type, step, partition) in the order of the stored ids."""
    records = instance.get_records_for_run(run_id, limit=10000).records
    ids = [r.storage_id for r in records]
    assert ids == sorted(ids)
    return [(r.event_log_entry.dagster_event_type, r.event_log_entry.step_key,
             getattr(r.event_log_entry.dagster_event, "partition", None) if r.event_log_entry.dagster_event else None)
            for r in records if r.event_log_entry.is_dagster_event]


def test_batches_written_behind_by_the_helper_are_stored_in_dagsters_order_and_read_as_stock(
        tmp_path, make_database, monkeypatch):
    """By default the pooled storage hands its batches to a helper process. The run's log is the same events
    in the same order as on stock dagster-postgres (every read and single event waits for the batches before
    it), and what the UI reads per wedding partition is the same."""
    with _pooled_beside_stock(tmp_path, make_database, monkeypatch, 5, behind=True) as (pooled, stock, batches):
        ours, theirs = _run_range(pooled), _run_range(stock)
        storage = pooled.event_log_storage
        assert storage._writer is not None and storage._writer.alive  # the helper wrote them
        assert not batches  # ... none of them in this process
        assert _run_log(pooled, ours.run_id) == _run_log(stock, theirs.run_id)
        assert _what_the_ui_shows(pooled, ours.run_id) == _what_the_ui_shows(stock, theirs.run_id)
        records = pooled.fetch_materializations(batch_probe.key, limit=100).records
        assert sorted(r.partition_key for r in records) == PROBE_WEDDINGS.get_partition_keys()


def test_batches_of_a_helper_that_died_are_stored_by_this_process_once(tmp_path, make_database, monkeypatch):
    """A helper killed before it wrote what it was handed: the next use of the storage stores those batches
    one event at a time here (Dagster's own fallback), each once, and a new helper takes the next batch."""
    import os
    import signal

    with _pooled_beside_stock(tmp_path, make_database, monkeypatch, 5, behind=True) as (pooled, _, _batches):
        ours = _run_range(pooled)
        storage = pooled.event_log_storage
        before = _run_log(pooled, ours.run_id)
        stored = [r.event_log_entry for r in pooled.get_records_for_run(
            ours.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=100).records]
        helper = storage._writer._process
        os.kill(helper.pid, signal.SIGSTOP)  # it takes nothing more in
        storage.store_event_batch(stored[:6])
        os.kill(helper.pid, signal.SIGKILL)
        helper.join(10)
        after = _run_log(pooled, ours.run_id)  # a read: waits, finds the helper gone, stores the batch here
        assert after == before + [(e.dagster_event_type, e.step_key, e.dagster_event.partition)
                                               for e in stored[:6]]
        storage.store_event_batch(stored[6:8])  # stored here while a new helper starts in the background
        assert len(_run_log(pooled, ours.run_id)) == len(after) + 2
        storage._starting.join(60)
        assert storage._writer is not None and storage._writer._process.pid != helper.pid
        storage.store_event_batch(stored[8:10])  # by the new helper
        assert len(_run_log(pooled, ours.run_id)) == len(after) + 4
