"""The partition id's one home: `platform`, what a valid id is, how a hostile value and a partition are
shown; the vault, the replicas' object keys and the snapshot reader all judge ids by it."""
from __future__ import annotations

import pytest

from wedbackup_dagster.core.errors import ReplicaKeyRejected, WedbackupError
from wedbackup_dagster.core.partitions import (PLATFORM, check_partition, is_partition, other_spellings,
                                               partition_label, shown)
from wedbackup_dagster.core.storage.replicas.base import archive_key, validate_partition
from wedbackup_dagster.core.storage.vault import Vault

GOOD = ["platform", "12", "0007", "a-b_C", "x" * 64, "3f2504e0-4f89-11d3-9a0c-0305e82c3301"]
BAD = ["", "x" * 65, "12\n", "../12", "1 2", "12/", "ü", None, 12, "platform\n"]


@pytest.mark.parametrize("value", GOOD)
def test_a_wedding_id_or_platform_is_a_partition(value):
    assert is_partition(value) and check_partition(value) == value


@pytest.mark.parametrize("value", BAD)
def test_anything_else_is_refused_with_the_value_shown_escaped(value):
    assert not is_partition(value)
    with pytest.raises(WedbackupError, match=r"^partition .* is not a wedding id") as caught:
        check_partition(value)
    assert shown(value) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("value", BAD)
def test_every_layer_judges_ids_the_same_way(tmp_path, value):
    with pytest.raises(ReplicaKeyRejected):
        validate_partition("s3", value)
    with pytest.raises(WedbackupError):
        Vault(tmp_path).path_for(value, "0" * 64)


def test_the_platform_partition_has_its_own_key_and_label():
    assert PLATFORM == "platform"
    assert archive_key("s3", "p", PLATFORM, "0" * 64) == f"p/platform/{'0' * 64}.wbk"
    assert archive_key("s3", "p", "12", "0" * 64) == f"p/weddings/12/{'0' * 64}.wbk"
    assert partition_label(PLATFORM) == "the platform partition" and partition_label("12") == "wedding 12"


def test_shown_bounds_and_escapes_a_hostile_value():
    assert shown("a\nb") == "'a\\nb'"
    assert len(shown("x" * 10_000)) == 80 and shown("x" * 10_000).endswith("...")


def test_other_spellings_of_integer_and_uuid_ids():
    assert other_spellings("7") == "^0*7$" and other_spellings("-07") == "^-0*7$"
    assert other_spellings("3F2504E0-4F89-11D3-9A0C-0305E82C3301").startswith("(?i)^")
    assert other_spellings("abc") is None
