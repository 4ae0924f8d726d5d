"""The resources carry their configuration: one engine per run, shared by the run's steps and its catalogue
closed when the run ends; the replicas resource builds each provider's replica from its own client resource."""
from __future__ import annotations

import dagster as dg

from wedbackup_dagster.core.storage.replicas import AzureReplica, GCSReplica, S3Replica
from wedbackup_dagster.shared.resources import ProviderReplicasResource, WedbackupEngineResource, build_resources


def test_one_engine_per_run_shared_by_its_steps_and_its_catalogue_closed_after(demo_env):
    demo_env(weddings=1, seed=3, document_bytes=16)
    engines = []

    @dg.op
    def first(wedbackup: WedbackupEngineResource) -> int:
        engines.append(wedbackup.engine())
        assert wedbackup.catalogue() is wedbackup.engine().catalogue  # the run's one catalogue connection
        return 1

    @dg.op
    def second(wedbackup: WedbackupEngineResource, _after: int) -> None:
        engines.append(wedbackup.engine())
        engines[-1].catalogue.counts()  # the connection is open and works inside the run

    @dg.job(resource_defs={"wedbackup": WedbackupEngineResource()}, executor_def=dg.in_process_executor)
    def two_steps():
        second(first())

    with dg.instance_for_test() as instance:
        assert two_steps.execute_in_process(instance=instance).success
        assert engines[0] is engines[1]
        assert engines[0].catalogue._conn is None  # closed by the resource's teardown
        assert two_steps.execute_in_process(instance=instance).success
    assert engines[2] is engines[3] and engines[2] is not engines[0]  # a new run, a new engine


def test_the_replicas_resource_gives_every_providers_replica_over_its_client(demo_env):
    demo_env(weddings=1, seed=3, document_bytes=16)
    replicas = build_resources()["replicas"]
    assert isinstance(replicas, ProviderReplicasResource)

    @dg.op
    def look(replicas: ProviderReplicasResource) -> dict:
        every = replicas.all()
        assert [type(r) for r in every.values()] == [S3Replica, GCSReplica, AzureReplica]
        assert list(replicas.all(only=["gcs"])) == ["gcs"] and replicas.all(only=["vault"]) == {}
        return {p: type(r).__name__ for p, r in every.items()}

    @dg.job(resource_defs={"replicas": replicas})
    def looking():
        look()

    result = looking.execute_in_process()
    assert result.output_for_node("look") == {"s3": "S3Replica", "gcs": "GCSReplica", "azure": "AzureReplica"}
