# The wedbackup image: the code location's gRPC server, and the same image for every run worker the
# DockerRunLauncher / K8sRunLauncher starts (and, in docker-compose, for the webserver and the daemon,
# so all of them run the same pinned Dagster). Build from the repository root:
#   docker build -t wedbackup-dagster:0.1.0 .
FROM python:3.11-slim

# pg_dump must match the source server's major version (wedbackup dumps the DDL with it and refuses an
# older client); Debian's own repository only has 15, so the client comes from apt.postgresql.org.
ARG PG_MAJOR=15
# dagster-docker / dagster-k8s hold the run launchers named in the production dagster.yaml / Helm
# chart; they are pinned with the dagster release in pyproject.toml (libraries are 0.x of 1.x).
ARG DAGSTER_LIBRARIES_VERSION=0.29.27

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    DAGSTER_COMPUTE_LOG_DIR=/var/lib/dagster/compute-logs \
    WEDBACKUP_VAULT_DIR=/var/lib/wedbackup/vault

RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends ca-certificates curl gnupg \
 && install -d /usr/share/postgresql-common/pgdg \
 && curl -fsSL https://www.postgresql.org/media/keys/ACCC4CF8.asc \
      | gpg --dearmor -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.gpg \
 && . /etc/os-release \
 && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.gpg]" \
      "https://apt.postgresql.org/pub/repos/apt ${VERSION_CODENAME}-pgdg main" > /etc/apt/sources.list.d/pgdg.list \
 && apt-get update -q \
 && apt-get install -y -q --no-install-recommends "postgresql-client-${PG_MAJOR}" \
 && apt-get purge -y -q curl gnupg && apt-get autoremove -y -q \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dagster/app
# Dependencies first (cached across code changes), then the package itself.
COPY pyproject.toml setup.cfg README.md ./
COPY wedbackup_dagster ./wedbackup_dagster
RUN pip install --quiet . \
      "dagster-docker==${DAGSTER_LIBRARIES_VERSION}" \
      "dagster-k8s==${DAGSTER_LIBRARIES_VERSION}"

# The production instance (PostgreSQL storage, run queue, pools, DockerRunLauncher) and the workspace
# that points the webserver and the daemon at the code server. On Kubernetes the Helm chart mounts its
# own dagster.yaml over this one.
COPY deployments/docker-compose/dagster.yaml deployments/docker-compose/workspace.yaml ${DAGSTER_HOME}/

# Never root: a run worker holds the master key and the provider credentials.
RUN useradd --system --uid 10001 --home-dir /opt/dagster --shell /usr/sbin/nologin wedbackup \
 && install -d -o wedbackup -g wedbackup "${WEDBACKUP_VAULT_DIR}" "${DAGSTER_COMPUTE_LOG_DIR}" \
 && chown -R wedbackup:wedbackup ${DAGSTER_HOME}
USER wedbackup

EXPOSE 4000
CMD ["dagster", "api", "grpc", "-m", "wedbackup_dagster.definitions", "-h", "0.0.0.0", "-p", "4000"]
