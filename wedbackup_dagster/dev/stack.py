"""The local stack: a real PostgreSQL and real local stand-ins for S3 (moto, s3_stand_in.py), GCS (gcp-storage-emulator)
and Azure Blob (Azurite), all on 127.0.0.1, owned by the project (`wedbackup stack up|down|status|env`).

Every process `up` starts is recorded by PID under the state directory; `down` stops exactly those.
Running `up` twice is harmless: a service already answering on its port is left alone. Starting and stopping
hold the state directory's lock (`Stack.locked`), so processes that restart the stand-ins at the same time
(benchmark parts, test sessions) take turns: two starts racing for a port left the loser's PID recorded and
the winner running unrecorded, which no `down` then stopped.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wedbackup_dagster.core.errors import StackError

# Default ports, in one place. Each can be overridden with WEDBACKUP_<NAME>_PORT. Below Linux's ephemeral range
# (32768-60999 by default), where the kernel picks every outgoing connection's own port: a stand-in started
# while a client connection happens to hold its port would fail to bind (it did, once, at 54322).
DEFAULT_PORTS = {"postgres": 25320, "s3": 25321, "gcs": 25322, "azure": 25323, "dagster": 3000}
SERVICES = ("postgres", "s3", "gcs", "azure")
AZURITE_VERSION = "3.37.0"
# Azurite's well-known development account: public, documented by Microsoft, not a secret.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
S3_ACCESS_KEY = "wedbackup-local"
DB_USER = "wedbackup"
SOURCE_DB = "wedding_platform"
CATALOGUE_DB = "wedbackup_catalogue"
DAGSTER_DB = "dagster"  # the local Dagster instance's storage (dagster.yaml, instance/storage.py: LocalStackStorage)


def project_root() -> Path:
    """The checkout this package lives in (editable install), else the current directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def state_dir() -> Path:
    configured = os.environ.get("WEDBACKUP_STATE_DIR")
    path = Path(configured) if configured else project_root() / ".wedbackup"
    return path.resolve()


def port(name: str) -> int:
    value = os.environ.get(f"WEDBACKUP_{name.upper()}_PORT")
    if value is None:
        return DEFAULT_PORTS[name]
    if not value.isdigit() or not 1024 <= int(value) <= 65535:
        raise StackError(f"WEDBACKUP_{name.upper()}_PORT must be a port number between 1024 and 65535")
    return int(value)


def port_open(p: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, p), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for(predicate, what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = ""
    if log and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise StackError(f"{what} did not become ready within {timeout:.0f} s{tail}")


_HELD = threading.local()  # Stack.locked: the state directories whose lock this thread holds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


@dataclass
class Stack:
    root: Path

    @classmethod
    def default(cls) -> Stack:
        return cls(state_dir())

    # ---- paths -----------------------------------------------------------------------------------
    @property
    def pid_dir(self) -> Path:
        return self.root / "pids"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def pg_data(self) -> Path:
        return self.root / "postgres" / "data"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.json"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    # ---- secrets generated once per stack (never in git: the state dir is ignored) ---------------
    def local_secrets(self) -> dict[str, str]:
        if self.secrets_file.exists():
            return json.loads(self.secrets_file.read_text())
        self.root.mkdir(parents=True, exist_ok=True)
        values = {
            "db_password": secrets.token_urlsafe(18),
            "s3_secret": secrets.token_urlsafe(24),
            "master_key": "local-1:" + base64.b64encode(os.urandom(32)).decode(),
        }
        fd = os.open(self.secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(values, fh)
        return values

    # ---- settings for the rest of the project --------------------------------------------------
    def dsn(self, dbname: str, user: str = DB_USER) -> str:
        pw = self.local_secrets()["db_password"]
        return f"postgresql://{user}:{pw}@127.0.0.1:{port('postgres')}/{dbname}"

    def env(self) -> dict[str, str]:
        s = self.local_secrets()
        self._prepare_dagster_home()  # DAGSTER_HOME must exist even before the first `up`
        azure = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port('azure')}/{AZURITE_ACCOUNT};"
        )
        return {
            "WEDBACKUP_STATE_DIR": str(self.root),
            "WEDBACKUP_SOURCE_DSN": self.dsn(SOURCE_DB),
            "WEDBACKUP_CATALOGUE_DSN": self.dsn(CATALOGUE_DB),
            "WEDBACKUP_SCRATCH_DSN": self.dsn("postgres"),
            "WEDBACKUP_VAULT_DIR": str(self.root / "vault"),
            "WEDBACKUP_MASTER_KEY": s["master_key"],
            "WEDBACKUP_S3_ENDPOINT_URL": f"http://127.0.0.1:{port('s3')}",
            "WEDBACKUP_S3_REGION": "eu-west-1",
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": s["s3_secret"],
            "AWS_DEFAULT_REGION": "eu-west-1",
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port('gcs')}",
            "WEDBACKUP_GCS_PROJECT": "wedbackup-local",
            "WEDBACKUP_AZURE_CONNECTION_STRING": azure,
            "DAGSTER_HOME": str(self.dagster_home),
            "WEDBACKUP_DAGSTER_PG_URL": self.dsn(DAGSTER_DB),
        }

    # ---- process bookkeeping ---------------------------------------------------------------------
    def _pid_file(self, name: str) -> Path:
        return self.pid_dir / f"{name}.pid"

    def recorded_pid(self, name: str) -> int | None:
        f = self._pid_file(name)
        try:
            return int(f.read_text().strip())
        except (OSError, ValueError):
            return None

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **(env or {})}, cwd=self.root,
        )
        self._pid_file(name).write_text(str(proc.pid))

    # ---- PostgreSQL --------------------------------------------------------------------------------
    def _as_postgres(self, argv: list[str]) -> list[str]:
        # initdb refuses to run as root: drop to the `postgres` system user when we are root.
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    @staticmethod
    def _pg_bin(tool: str) -> str:
        for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), reverse=True):
            return str(candidate)
        found = shutil.which(tool)
        if not found:
            raise StackError(f"{tool} not found: install PostgreSQL (apt-get install -y postgresql)")
        return found

    def _ensure_postgres_installed(self) -> None:
        if list(Path("/usr/lib/postgresql").glob("*/bin/postgres")) or shutil.which("postgres"):
            return
        if os.geteuid() != 0:
            raise StackError("PostgreSQL is not installed; run: sudo apt-get install -y postgresql")
        subprocess.run(["apt-get", "update", "-q"], check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})

    def _chown_postgres(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def start_postgres(self) -> None:
        p = port("postgres")
        if port_open(p):
            # A stack started by an older version lacks the `dagster` database. A server that is not this
            # stack's (another password) is left alone, as before; Dagster then names the missing database.
            try:
                self._create_databases()
            except Exception:  # noqa: BLE001 - psycopg's errors; nothing here may print the DSN
                pass
            return
        self._ensure_postgres_installed()
        pg_root = self.pg_data.parent
        pg_root.mkdir(parents=True, exist_ok=True)
        self._chown_postgres(pg_root)
        # The postgres user must be able to reach the state dir.
        for parent in [self.root, *self.root.parents]:
            if parent == Path("/"):
                break
            try:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o011)
            except PermissionError:
                break
        if not (self.pg_data / "PG_VERSION").exists():
            pwfile = pg_root / "pwfile"
            pwfile.write_text(self.local_secrets()["db_password"] + "\n")
            self._chown_postgres(pwfile)
            os.chmod(pwfile, 0o600)
            try:
                subprocess.run(
                    self._as_postgres([self._pg_bin("initdb"), "-D", str(self.pg_data), "-U", DB_USER,
                                       "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                                       "--locale=C.UTF-8"]),
                    check=True, capture_output=True)
            except subprocess.CalledProcessError as exc:
                raise StackError(f"initdb failed: {exc.stderr.decode(errors='replace')[-800:]}") from None
            finally:
                pwfile.unlink(missing_ok=True)
        log = self.log_dir / "postgres.log"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log.touch()
        self._chown_postgres(self.log_dir)
        self._chown_postgres(log)
        # The data directory is throw-away, so durability settings are relaxed for speed; the project's
        # own writes (vault, providers) do their own fsync and never rely on this server's.
        opts = (f"-p {p} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                "-c shared_buffers=256MB"
                # The change feed (issue 18) reads a logical replication slot: logical WAL, room for the
                # slots of several test sessions, and a cap so a forgotten slot cannot fill the disk.
                " -c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20"
                " -c max_slot_wal_keep_size=2GB")
        result = subprocess.run(
            self._as_postgres([self._pg_bin("pg_ctl"), "-D", str(self.pg_data), "-l", str(log), "-o", opts,
                               "-w", "-t", "60", "start"]),
            capture_output=True)
        if result.returncode != 0 and not port_open(p):
            raise StackError(f"PostgreSQL did not start: {result.stderr.decode(errors='replace')[-400:]}\n"
                             + "\n".join(log.read_text(errors="replace").splitlines()[-10:]))
        pid_line = (self.pg_data / "postmaster.pid").read_text().splitlines()[0]
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self._pid_file("postgres").write_text(pid_line.strip())
        _wait_for(lambda: port_open(p), "PostgreSQL", 30, log)
        self._create_databases()

    def _create_databases(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
            for db in (SOURCE_DB, CATALOGUE_DB, DAGSTER_DB):
                if db not in existing:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))

    def stop_postgres(self) -> None:
        if not (self.pg_data / "postmaster.pid").exists():
            self._pid_file("postgres").unlink(missing_ok=True)
            return
        subprocess.run(self._as_postgres([self._pg_bin("pg_ctl"), "-D", str(self.pg_data), "-m", "fast",
                                          "-w", "stop"]), capture_output=True)
        self._pid_file("postgres").unlink(missing_ok=True)

    # ---- storage stand-ins -------------------------------------------------------------------------
    def _venv_bin(self, tool: str) -> str:
        candidate = Path(sys.executable).parent / tool
        if candidate.exists():
            return str(candidate)
        found = shutil.which(tool)
        if not found:
            raise StackError(f"{tool} not found: run `make install`")
        return found

    def start_s3(self) -> None:
        p = port("s3")
        if port_open(p):
            return
        secrets_ = self.local_secrets()
        env = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secrets_["s3_secret"]}
        # moto's application under a keep-alive server (s3_stand_in.py); moto_server if that one cannot start.
        self._spawn("s3", [sys.executable, "-m", "wedbackup_dagster.dev.s3_stand_in", "-H", "127.0.0.1",
                           "-p", str(p)], env=env)
        pid = self.recorded_pid("s3")
        _wait_for(lambda: port_open(p) or not (pid and _pid_alive(pid)), "S3 stand-in (moto)", 60,
                  self.log_dir / "s3.log")
        if port_open(p):
            return
        self._spawn("s3", [self._venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(p)], env=env)
        _wait_for(lambda: port_open(p), "S3 stand-in (moto_server)", 60, self.log_dir / "s3.log")

    def start_gcs(self) -> None:
        p = port("gcs")
        if port_open(p):
            return
        # gcp-storage-emulator through gcs_stand_in.py, which removes its per-upload rewrite of all metadata.
        self._spawn("gcs", [sys.executable, "-m", "wedbackup_dagster.dev.gcs_stand_in", "start",
                            "--host", "127.0.0.1", "--port", str(p), "--in-memory", "-q"])
        _wait_for(lambda: port_open(p), "GCS stand-in (gcp-storage-emulator)", 60, self.log_dir / "gcs.log")

    def azurite_bin(self) -> Path:
        return self.root / "node" / "node_modules" / ".bin" / "azurite-blob"

    def install_azurite(self) -> None:
        if self.azurite_bin().exists():
            return
        npm = shutil.which("npm")
        if not npm:
            raise StackError("npm not found: install Node.js (apt-get install -y nodejs npm)")
        prefix = self.root / "node"
        prefix.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
                                 f"azurite@{AZURITE_VERSION}"], capture_output=True)
        if result.returncode != 0 or not self.azurite_bin().exists():
            raise StackError(f"installing Azurite failed: {result.stderr.decode(errors='replace')[-600:]}")

    def start_azure(self) -> None:
        p = port("azure")
        if port_open(p):
            return
        self.install_azurite()
        # In-memory: Azurite refuses --location with it, and writes its debug files into cwd (the state dir).
        self._spawn("azure", [str(self.azurite_bin()), "--blobHost", "127.0.0.1", "--blobPort", str(p),
                              "--inMemoryPersistence", "--skipApiVersionCheck", "--silent"])
        _wait_for(lambda: port_open(p), "Azure stand-in (Azurite)", 60, self.log_dir / "azure.log")

    def _prepare_dagster_home(self) -> None:
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        link = self.dagster_home / "dagster.yaml"
        source = project_root() / "dagster.yaml"
        if source.exists() and not link.exists():
            link.symlink_to(source)

    # ---- the verbs ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """This stack's services to start or stop alone: the state directory's lock, held across processes
        (flock) and taken again freely by the thread that holds it."""
        key = str(self.root)
        if getattr(_HELD, key, False):  # this thread holds it already (an outer call releases it)
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "stack.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            setattr(_HELD, key, True)
            try:
                yield
            finally:
                setattr(_HELD, key, False)
                fcntl.flock(fh, fcntl.LOCK_UN)

    def up(self, services: tuple[str, ...] = SERVICES) -> None:
        with self.locked():
            self.local_secrets()
            self._prepare_dagster_home()
            starters = {"postgres": self.start_postgres, "s3": self.start_s3, "gcs": self.start_gcs,
                        "azure": self.start_azure}
            for name in services:
                starters[name]()

    def stop_service(self, name: str) -> None:
        """Stop one service that `up` started (used by `down` and by provider-outage tests)."""
        with self.locked():
            self._stop_service(name)

    def _stop_service(self, name: str) -> None:
        if name == "postgres":
            self.stop_postgres()
            return
        pid = self.recorded_pid(name)
        if pid is None:
            return
        if _pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            # The storage stand-ins keep everything in memory, so there is nothing to flush: Azurite spends ~9 s
            # on a graceful SIGTERM, which every restart of it (outage tests, each benchmark part) waited out.
            deadline = time.monotonic() + (10 if name == "dagster" else 1)
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._pid_file(name).unlink(missing_ok=True)
        # Until nothing answers on the port: a start right after would otherwise find it still open and
        # return (or fail to bind, the GCS emulator then living on without a listener).
        deadline = time.monotonic() + 5
        while port_open(port(name)) and time.monotonic() < deadline:
            time.sleep(0.05)

    def down(self) -> None:
        with self.locked():
            for name in ("dagster", *reversed(SERVICES)):
                self._stop_service(name)

    def status(self) -> list[dict[str, object]]:
        rows = []
        for name in (*SERVICES, "dagster"):
            pid = self.recorded_pid(name)
            rows.append({
                "service": name,
                "port": port(name),
                "answering": port_open(port(name)),
                "pid": pid,
                "ours": bool(pid and _pid_alive(pid)),
            })
        return rows

    def is_up(self) -> bool:
        return all(port_open(port(name)) for name in SERVICES)


def export_lines(env: dict[str, str]) -> str:
    import shlex

    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
