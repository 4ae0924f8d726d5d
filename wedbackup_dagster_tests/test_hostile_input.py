"""Hostile input: wedding ids and settings with SQL, path and shell metacharacters, control characters,
unicode and absurd lengths are refused with an error naming the input (escaped and bounded), or quoted
safely; object keys and vault paths can never leave their prefix or folder (property tests); tables,
columns and schemas with such names in the source are backed up and restored exactly."""
from __future__ import annotations

import os
import posixpath
import string
from pathlib import Path

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from wedbackup_dagster import cli
from wedbackup_dagster.backups.partitions import validated_keys
from wedbackup_dagster.dev import demo_data
from wedbackup_dagster.core.config import Settings
from wedbackup_dagster.core.engine import Engine
from wedbackup_dagster.core.errors import ConfigError, ReplicaKeyRejected, WedbackupError
from wedbackup_dagster.core.storage.health import HealthSettings
from wedbackup_dagster.core.storage.replicas.base import (archive_key, check_key, check_list_prefix, object_metadata,
                                                          parse_archive_key)
from wedbackup_dagster.core.storage.vault import Vault
from wedbackup_dagster.core.partitions import check_partition

SHA = "ab" * 32
HOSTILE_IDS = [
    "1; DROP TABLE weddings", "1' OR '1'='1", "a'b", 'a"b', "../../etc", "..", ".", "./1", "1/..", "a/b", "a\\b",
    "$(rm -rf /)", "`id`", "1|sh", "1&&reboot", "%2e%2e", "a\x00b", "12\n", "12\r\n", "\n12", "12 ", " 12", "",
    "１２", "é", "wedding-😀", "\u202e12", "x" * 65, "1" * 10_000, "platform/..", None, 12, b"12",
]
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@pytest.mark.parametrize("wedding", HOSTILE_IDS, ids=lambda v: repr(v)[:30])
def test_hostile_wedding_ids_are_refused_everywhere_with_a_bounded_message(wedding, tmp_path):
    for refuse in (check_partition, lambda w: validated_keys([w]), lambda w: Vault(tmp_path).path_for(w, SHA)):
        with pytest.raises(WedbackupError) as err:
            refuse(wedding)
        message = str(err.value)
        assert len(message) < 200 and "\n" not in message and "\x00" not in message
        assert repr(wedding)[:40] in message
    with pytest.raises(WedbackupError):
        with Vault(tmp_path / "vault").incoming(wedding):
            pass
    for provider in ("s3", "gcs", "azure"):
        with pytest.raises(ReplicaKeyRejected, match=provider):
            archive_key(provider, "wedbackup", wedding, SHA)
    assert not (tmp_path / "vault").exists() or not any((tmp_path / "vault").iterdir())


def test_longest_and_platform_ids_are_accepted():
    # "-rf" is a legal id: ids never reach a shell or another program's argv.
    for ok in ("1" * 64, "platform", "wedding_12-b", "0", "-rf"):
        assert check_partition(ok) == ok
        assert archive_key("s3", "wedbackup", ok, SHA).startswith("wedbackup/")


@pytest.mark.parametrize("argv", [
    ["backup", "--wedding", "1; DROP TABLE weddings"],
    ["backup", "--wedding", "3", "../../etc"],
    ["backup", "--wedding", "$(rm -rf /)"],
    ["restore", "--wedding", "a'b", "--target-dsn", "postgresql://x@127.0.0.1:1/nowhere"],
    ["restore", "--wedding", "12\n", "--target-dsn", "postgresql://x@127.0.0.1:1/nowhere"],
], ids=lambda v: " ".join(v)[:40])
def test_the_command_line_refuses_hostile_ids_before_touching_anything(argv, monkeypatch, capsys):
    # No database or Dagster is configured: the refusal must come first.
    for name in ("WEDBACKUP_SOURCE_DSN", "WEDBACKUP_CATALOGUE_DSN", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    bad = next(a for a in argv[2:] if not a.isdigit())
    assert err.startswith("wedbackup: partition ") and repr(bad) in err and "Traceback" not in err


BASE = {"WEDBACKUP_SOURCE_DSN": "postgresql://app:Sup3rSecretPw@db.example:5432/platform",
        "WEDBACKUP_CATALOGUE_DSN": "postgresql://app:Sup3rSecretPw@db.example:5432/catalogue"}
HOSTILE_SETTINGS = [
    ("WEDBACKUP_S3_PREFIX", ["wedbackup/", "/wedbackup", "a//b", "a/./b", "a/../b", "a/.", "..", "wedbackup\n",
                             "$(rm -rf /)", "a b", "a;b", "é", "x" * 300, "\x00"]),
    ("WEDBACKUP_GCS_PREFIX", ["a/..", "gs://x", "a\\b", "`id`"]),
    ("WEDBACKUP_AZURE_PREFIX", ["a/./b", "a?b", "a#b", "a%2f..%2fb"]),
    ("WEDBACKUP_S3_BUCKET", ["Bad_Bucket", "a..b", "bucket\n", "-bucket", "b;rm -rf", "a", "x" * 64, "ab/c"]),
    ("WEDBACKUP_GCS_BUCKET", ["bucket'--", "bucket name"]),
    ("WEDBACKUP_AZURE_CONTAINER", ["Container", "c;d", "c--\n", "c/../d"]),
    ("WEDBACKUP_GCS_PROJECT", ["proj; drop", "Proj", "p\n"]),
    ("WEDBACKUP_S3_REGION", ["eu-west-1; rm", "../eu", "eu-west-1\n"]),
    ("WEDBACKUP_AZURE_TIER", ["Hot; rm", "hot", "Hot\n", "' OR 1=1"]),
    ("WEDBACKUP_S3_STORAGE_CLASS", ["STANDARD\n", "standard"]),
    ("WEDBACKUP_S3_SSE", ["AES256 ", "$(id)"]),
    ("WEDBACKUP_ZSTD_LEVEL", ["²", "1e3", "3\n", "-1", "0x3", "٣", "3; rm"]),
    ("WEDBACKUP_LOCK_TIMEOUT", ["nan", "inf", "-0.5", "1e9", "10s"]),
    ("WEDBACKUP_SNAPSHOT_LOCK_TIMEOUT", ["nan", "inf", "0", "-1", "1e9", "10s"]),
    ("WEDBACKUP_VAULT_DIR", ["vault\x00/etc", "vault\n", "\x1b[31mvault"]),
    ("WEDBACKUP_S3_ENDPOINT_URL", ["file:///etc/passwd", "javascript:alert(1)", "http://", "127.0.0.1:9000"]),
    ("WEDBACKUP_SOURCE_DSN", ["postgresql://app:Sup3rSecretPw@db:99999/x", "postgresql://app:Sup3rSecretPw@db:x/y",
                              "host=db password=Sup3rSecretPw port='; DROP", "not a dsn'; DROP TABLE x; --"]),
    ("WEDBACKUP_AZURE_CONNECTION_STRING", ["$(rm -rf /)"]),
]


@pytest.mark.parametrize("variable, value", [(v, x) for v, values in HOSTILE_SETTINGS for x in values],
                         ids=lambda v: repr(v)[:30])
def test_hostile_settings_are_refused_naming_the_variable_never_the_secret(variable, value):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({**BASE, variable: value})
    assert err.value.variable == variable
    assert str(err.value).startswith(f"configuration {variable}: ")
    assert "Sup3rSecretPw" not in str(err.value)


@pytest.mark.parametrize("value", ["²", "0", "101", "2\n", "two"])
def test_hostile_health_settings_are_refused(value):
    with pytest.raises(ConfigError, match="WEDBACKUP_PROVIDER_DOWN_AFTER"):
        HealthSettings.from_env({"WEDBACKUP_PROVIDER_DOWN_AFTER": value})


def test_odd_but_valid_settings_are_taken_literally():
    s = Settings.from_env({**BASE, "WEDBACKUP_VAULT_DIR": "/srv/va'ult $(touch pwned) ü",
                           "WEDBACKUP_S3_PREFIX": "team-a/wed.backup_1", "WEDBACKUP_ZSTD_LEVEL": "19"})
    assert s.vault_dir == Path("/srv/va'ult $(touch pwned) ü") and s.s3.prefix == "team-a/wed.backup_1"


# ---- object keys and vault paths: property tests --------------------------------------------------

NASTY = st.lists(st.sampled_from(list(string.printable) + ["\x00", "é", "😀", "\u202e", "%2e", "..", "/", "1", "a"]),
                 max_size=40).map("".join)
PREFIXES = st.sampled_from(["wedbackup", "team-a/wed.backup_1", "p"])


def assert_inside(prefix: str, key: str) -> None:
    assert key.startswith(prefix + "/")
    assert posixpath.normpath(key) == key  # nothing for a provider (or a filesystem emulator) to resolve
    segments = key[len(prefix) + 1:].split("/")
    assert all(s not in ("", ".", "..") for s in segments)
    assert all(c.isascii() and c.isprintable() for c in key)


@PROPERTY
@given(prefix=PREFIXES, partition=st.one_of(NASTY, st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)),
       sha=st.one_of(NASTY, st.just(SHA), st.from_regex(r"[0-9a-f]{64}", fullmatch=True)))
def test_archive_keys_never_leave_their_prefix_and_parse_back(prefix, partition, sha):
    try:
        key = archive_key("s3", prefix, partition, sha)
    except ReplicaKeyRejected:
        return
    assert_inside(prefix, key)
    assert check_key("s3", prefix, key) == key
    assert parse_archive_key(prefix, key) == (partition, sha)


@PROPERTY
@given(prefix=PREFIXES, rest=NASTY)
def test_keys_handed_back_are_refused_unless_inside_the_prefix(prefix, rest):
    for key in (f"{prefix}/{rest}", rest, f"{prefix}{rest}", f"{prefix}/weddings/{rest}/{SHA}.wbk"):
        try:
            checked = check_key("azure", prefix, key)
        except ReplicaKeyRejected as err:
            assert "\x00" not in str(err) and len(str(err)) < 400
            continue
        assert_inside(prefix, checked)


@PROPERTY
@given(prefix=PREFIXES, sub=NASTY)
def test_list_prefixes_never_climb_out(prefix, sub):
    try:
        listed = check_list_prefix("gcs", prefix, sub)
    except ReplicaKeyRejected:
        return
    assert listed.startswith(prefix + "/")
    assert ".." not in listed.split("/")


@PROPERTY
@given(name=NASTY, value=NASTY)
def test_object_metadata_is_printable_ascii_or_refused(name, value):
    try:
        meta = object_metadata("s3", "3", SHA, {name: value})
    except ReplicaKeyRejected:
        return
    for k, v in meta.items():
        assert k.isascii() and v.isascii() and v.isprintable() and "\n" not in v


@PROPERTY
@given(partition=NASTY, sha=st.one_of(NASTY, st.just(SHA)))
def test_vault_paths_stay_in_their_partition_folder(tmp_path_factory, partition, sha):
    root = Path("/srv/vault")
    try:
        path = Vault(root).path_for(partition, sha)
    except WedbackupError:
        return
    assert path.parent.parent == root and path.name == f"{sha}.wbk" and path.parent.name == partition
    assert os.path.normpath(path) == str(path)


# ---- identifiers from the source database -----------------------------------------------------------

WEIRD_TABLE = 'we"ird; DROP TABLE weddings; --'
WEIRD_SCHEMA = "sch'ema $(rm -rf /)"
WEIRD_COLUMNS = ['co"l\'; $(rm -rf /)', "Ünïcödé 😀", "select"]


def test_tables_and_columns_with_hostile_names_are_backed_up_and_restored_exactly(stack, make_database, tmp_path,
                                                                                   monkeypatch):
    source, catalogue, target = make_database(), make_database(), make_database()
    vault = tmp_path / "va'ult $(touch pwned)"
    for name, value in {"WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": catalogue,
                        "WEDBACKUP_VAULT_DIR": str(vault)}.items():
        monkeypatch.setenv(name, value)
    demo_data.generate(source, weddings=3, seed=11, document_bytes=64)
    table, schema = sql.Identifier("public", WEIRD_TABLE), sql.Identifier(WEIRD_SCHEMA)
    cols = [sql.Identifier(c) for c in WEIRD_COLUMNS]
    values = ["tab\there, new\nline, back\\slash", "'; DROP TABLE weddings; --", "\\N"]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, wedding_id bigint "
                             "NOT NULL REFERENCES public.weddings (id) ON DELETE CASCADE, {} text, {} text, {} text)")
                     .format(table, *cols))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        conn.execute(sql.SQL("CREATE TABLE {} ({} bigint PRIMARY KEY, wedding_id bigint REFERENCES public.weddings (id), "
                             "note text)").format(sql.Identifier(WEIRD_SCHEMA, WEIRD_TABLE), cols[2]))
        for wedding in (1, 2, 3):
            conn.execute(sql.SQL("INSERT INTO {} (wedding_id, {}, {}, {}) VALUES (%s, %s, %s, %s)").format(table, *cols),
                         (wedding, *values))
            conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(sql.Identifier(WEIRD_SCHEMA, WEIRD_TABLE)),
                         (wedding, wedding, f"{wedding}: $(rm -rf /) '\"; --"))
    engine = Engine.from_env()
    with engine.snapshot_session() as session:
        engine.back_up("platform", session)
        outcome = engine.back_up("3", session)
    names = {(t["schema"], t["name"]): t["rows"] for t in outcome.manifest["tables"]}
    assert names[("public", WEIRD_TABLE)] == 1 and names[(WEIRD_SCHEMA, WEIRD_TABLE)] == 1
    assert engine.verify("3", {}, provider="vault").tables  # restored into scratch, checked against manifest
    engine.restore_to("platform", target, {})
    engine.restore_to("3", target, {})

    def rows(dsn: str, where: sql.Identifier) -> list[tuple]:
        with psycopg.connect(dsn) as conn:
            return conn.execute(sql.SQL("SELECT * FROM {} WHERE wedding_id = 3 ORDER BY 1").format(where)).fetchall()

    for where in (table, sql.Identifier(WEIRD_SCHEMA, WEIRD_TABLE)):
        assert rows(target, where) == rows(source, where) and rows(target, where)
    with psycopg.connect(source) as conn:  # nothing was injected along the way
        assert conn.execute("SELECT count(*) FROM public.weddings").fetchone()[0] == 3
    assert vault.is_dir() and not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()


def test_a_hostile_dagster_partition_key_fails_its_run_naming_the_key(stack, make_database, tmp_path, monkeypatch):
    bad, worse = "../../etc", "1; DROP TABLE weddings"
    import dagster as dg

    from wedbackup_dagster.cli.cmd_backup import QUIET
    from wedbackup_dagster.definitions import defs

    source, catalogue = make_database(), make_database()
    vault = tmp_path / "vault"
    for name, value in {"WEDBACKUP_SOURCE_DSN": source, "WEDBACKUP_CATALOGUE_DSN": catalogue,
                        "WEDBACKUP_VAULT_DIR": str(vault), "WEDBACKUP_RESTORE_TARGET_DSN": source}.items():
        monkeypatch.setenv(name, value)
    demo_data.generate(source, weddings=2, seed=3, document_bytes=64)

    def failures(result) -> str:
        return " ".join(e.step_failure_data.error.to_string() for e in result.all_events
                        if e.event_type_value == "STEP_FAILURE")  # with its cause: our WedbackupError

    with dg.instance_for_test() as instance:
        # Someone added the key behind wedbackup's back (discovery only ever adds ids from the source).
        instance.add_dynamic_partitions("weddings", [bad])
        backup = defs.resolve_job_def("backup_weddings").execute_in_process(
            instance=instance, partition_key=bad, raise_on_error=False, run_config=QUIET)
        assert not backup.success and repr(bad) in failures(backup) and "is not a wedding id" in failures(backup)
        restore_run = defs.resolve_job_def("restore_wedding").execute_in_process(
            instance=instance, raise_on_error=False,
            run_config={**QUIET, "ops": {"restore_partition": {"config": {"partition": worse}}}})
        assert not restore_run.success and repr(worse) in failures(restore_run)
    assert not vault.exists() or not any(vault.rglob("*"))
    with psycopg.connect(catalogue) as conn:
        exists = conn.execute("SELECT to_regclass('wedbackup.backups') IS NOT NULL").fetchone()[0]
        assert not exists or conn.execute("SELECT count(*) FROM wedbackup.backups").fetchone()[0] == 0
    with psycopg.connect(source) as conn:
        assert conn.execute("SELECT count(*) FROM public.weddings").fetchone()[0] == 2


@pytest.mark.parametrize("data", [
    {1: "x", "tiers": {}},  # mixed key types used to crash sorted()
    {None: 1, "a\nb": 2},
    {"tiers": {"critical\n; DROP": {"rpo": "1h"}}},
    {"tiers": {"critical": {"rpo": "1h", 7: 1, "x": 2}}},
    {"season": {"months\x00": [1], 3: 4}},
    {"x" * 10_000: 1},
    {"tiers": {"critical": {"rpo": "$(rm -rf /)"}}},
    {"tiers": {"critical": {"rpo": "1h\n"}}, "critical_days": "7; DROP"},
])
def test_a_hostile_policy_file_is_refused_naming_the_setting_escaped(data):
    from wedbackup_dagster.core.policy.backup_policy import Policy

    with pytest.raises(ConfigError) as err:
        Policy.from_mapping(data)
    message = str(err.value)
    assert message.startswith("configuration policy") and len(message) < 400
    assert "\n" not in message and "\x00" not in message


@pytest.mark.parametrize("target", ["host=x hunter2hunter2", "hunter2hunter2", "host=x password='hunter2hunter2",
                                    "postgresql://u:hunter2hunter2@127.0.0.1:1/db",
                                    "host=127.0.0.1 port=1 password=hunter2hunter2 dbname=x"])
def test_a_malformed_restore_target_is_a_restore_error_that_never_echoes_it(target):
    # The target DSN is the one connection string that comes straight from a person (restore --target-dsn);
    # psycopg's own parse error quoted it, password included.
    import io
    import json

    from wedbackup_dagster.core.postgres import load_snapshot as restore
    from wedbackup_dagster.core.errors import RestoreError
    from wedbackup_dagster.core.formats.snapshot_stream import (HEADER, MAGIC, MANIFEST, POST_DATA, PRE_DATA,
                                                                write_record)

    stream = io.BytesIO()
    stream.write(MAGIC)
    write_record(stream, HEADER, json.dumps({"format": "wedbackup-snapshot", "version": 1, "partition": "3",
                                             "schema_fingerprint": "x"}).encode())
    for kind, payload in ((PRE_DATA, b""), (POST_DATA, b""), (MANIFEST, b"{}")):
        write_record(stream, kind, payload)
    with pytest.raises(RestoreError, match="cannot connect to") as err:
        restore.restore_snapshot([stream.getvalue()], target)
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("text", ["restore into host=db password=hunter2hunter2 dbname=x failed",
                                  "host=db password='hunter2 hunter2' port=1", "PASSWORD = hunter2hunter2",
                                  "postgresql://app:hunter2hunter2@db/x", "password='hunter2hunter2"])
def test_redact_hides_passwords_in_both_forms_of_a_dsn(text):
    from wedbackup_dagster.core.config import redact

    assert "hunter2" not in redact(text, {}) and "***" in redact(text, {})
