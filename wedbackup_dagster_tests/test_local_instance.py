"""The local Dagster instance (the project's dagster.yaml in DAGSTER_HOME) on the stack's PostgreSQL with
stock dagster-postgres, production's storage; on SQLite where no stack runs. No password in any file."""
import dagster as dg
import psycopg
from dagster._core.storage.runs import SqliteRunStorage
from dagster._serdes import serialize_value
from dagster_postgres import PostgresRunStorage

from wedbackup_dagster.dev.stack import DAGSTER_DB, project_root
from wedbackup_dagster.instance.storage import PG_URL_SETTING, PooledPostgresEventLogStorage


@dg.op
def probe():
    yield dg.AssetMaterialization("local_instance_probe")
    yield dg.Output(None)


@dg.job
def probe_job():
    probe()


def local_home(tmp_path, monkeypatch):
    """A DAGSTER_HOME set up as the stack does it: the project's dagster.yaml linked in."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").symlink_to(project_root() / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def test_the_local_instance_runs_on_postgres_when_the_stack_gives_its_url(tmp_path, make_database, monkeypatch):
    home = local_home(tmp_path, monkeypatch)
    url = make_database()
    monkeypatch.setenv(PG_URL_SETTING, url)
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        # Its event log keeps a connection (the range runs store some events one by one).
        assert isinstance(instance.event_log_storage, PooledPostgresEventLogStorage)
        assert probe_job.execute_in_process(instance=instance).success
        # A run worker or the webserver reloads the instance from its ref: it names the variable, not the URL.
        password = psycopg.conninfo.conninfo_to_dict(url)["password"]
        assert password not in serialize_value(instance.get_ref())
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM runs WHERE pipeline_name = 'probe_job'").fetchone()[0] == 1
    assert not list(home.glob("**/*.db"))  # nothing went to SQLite
    for path in home.rglob("*"):
        if path.is_file():
            assert password not in path.read_text(errors="replace"), path


def test_without_the_stack_the_local_instance_is_sqlite_under_dagster_home(tmp_path, monkeypatch):
    home = local_home(tmp_path, monkeypatch)
    monkeypatch.delenv(PG_URL_SETTING, raising=False)
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, SqliteRunStorage)
        assert probe_job.execute_in_process(instance=instance).success
        assert len(instance.get_runs()) == 1
    assert (home / "history" / "runs.db").exists()


def test_the_stack_points_the_instance_at_its_dagster_database(stack):
    env = stack.env()
    assert env[PG_URL_SETTING] == stack.dsn(DAGSTER_DB)
    stack.up(("postgres",))  # running already: makes sure the database exists
    with psycopg.connect(env[PG_URL_SETTING]) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == DAGSTER_DB
    # The file in git names the variable only.
    text = (project_root() / "dagster.yaml").read_text()
    assert PG_URL_SETTING in text and "postgresql://" not in text
