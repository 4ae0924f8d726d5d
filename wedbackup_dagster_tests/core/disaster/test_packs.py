"""DR packs on the real stack (core/disaster/packs.py): built from the providers' copies once the vault is lost,
read by restore --all from S3 with every table equal to the source — even with a wedding's own object gone;
nothing in a pack trusted (a forged index pointing a wedding at another's bytes, a segment overwritten, an index
that is not JSON or does not match its name: each wedding still restored, from its own object); pruning keeps
the newest two packs and spares young segments; an erased wedding's packs forgotten. `plan` unit-tested."""
from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime, timedelta, timezone

import pytest

from wedbackup_dagster.core import disaster
from wedbackup_dagster.core.disaster import pack_build, packs
from wedbackup_dagster.core.errors import WedbackupError
from wedbackup_dagster.dev.compare import table_sums
from wedbackup_dagster_tests.core.disaster.test_restore_all import WEDDINGS, platform, s3_only  # noqa: F401

pytestmark = pytest.mark.stack


def _put(replica, key: str, body: bytes) -> None:
    replica.client.put_object(Bucket=replica.target.bucket, Key=key, Body=body)


def _get(replica, key: str) -> bytes:
    out = io.BytesIO()
    replica.download(key, out)
    return out.getvalue()


def _index_keys(replica) -> list[str]:
    return [k for _, _, k in packs._indexes(replica)]


def test_restore_all_from_s3_reads_the_pack_and_equals_the_source(platform, make_database):
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    built = pack_build.build_pack(engine, {"s3": s3})
    assert built.ok and built.weddings == WEDDINGS and not built.left_out, built.lines()
    assert built.uploaded["s3"] == built.segments >= 1 and built.published["s3"] in _index_keys(s3)
    # A rebuild of the same archives finds every segment in place and uploads only a new index.
    again = pack_build.build_pack(engine, {"s3": s3})
    assert again.ok and again.already_there["s3"] == built.segments and "s3" not in again.uploaded
    assert len(_index_keys(s3)) == 2
    built = again
    # A wedding's own object lost at S3: the pack still holds its archive, checked against the catalogue.
    own = next(c for c in engine.catalogue.copies(engine.catalogue.latest_backup("3").id) if c.provider == "s3")
    s3.delete(own.object_key)
    target = make_database()
    report = disaster.restore_all(engine, platform["replicas"], target, s3_only())
    assert report.complete, report.lines()
    assert report.from_pack == WEDDINGS and report.pack == "s3:" + built.published["s3"]
    assert report.copies_used == {"s3": WEDDINGS + 1} and not report.fallbacks
    assert any(line.startswith("  DR pack: s3:") for line in report.lines())
    assert table_sums(target) == platform["expected"]


def test_nothing_in_a_pack_is_trusted(platform, make_database):
    """A forged index (newest, well-formed, its name matching its bytes) points wedding 3's archive at wedding
    2's bytes, and a segment of the older pack is overwritten: every wedding is still restored exactly — 3 from
    its own object, with the pack's refusal in the report."""
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    built = pack_build.build_pack(engine, {"s3": s3})
    assert built.ok, built.lines()
    pack, notes = packs.newest_pack(s3)
    assert pack is not None and not notes
    where = pack.locate()
    sha3 = engine.catalogue.latest_backup("3").archive_sha256
    sha2 = engine.catalogue.latest_backup("2").archive_sha256
    seg2, e2 = where[sha2]
    segments = []
    for s in pack.segments:
        entries = [e for e in s.entries if e.partition != "3"]  # wedding 3's true entry gone …
        if s.sha256 == seg2.sha256:  # … and wedding 2's entry relabelled as wedding 3's archive
            entries = [packs.Entry("3", sha3, e.offset, e.size) if e == e2 else e for e in entries]
        segments.append(packs.Segment(s.key, s.sha256, s.size, tuple(entries)))
    assert any(e.partition == "3" and e.archive_sha256 == sha3 for s in segments for e in s.entries)
    forged = packs.index_document(datetime.now(timezone.utc).isoformat(), segments)
    _put(s3, packs.index_key(s3, packs.stamp_of(datetime.now(timezone.utc) + timedelta(seconds=5)),
                             hashlib.sha256(forged).hexdigest()), forged)
    target = make_database()
    report = disaster.restore_all(engine, platform["replicas"], target, s3_only())
    assert report.complete, report.lines()
    assert table_sums(target) == platform["expected"]
    assert any("wedding 3" in line and "DR pack" in line and "do not match the catalogue" in line
               for line in report.fallbacks), report.fallbacks
    # The segment holding wedding 1 overwritten with other bytes: its download fails its SHA-256, its weddings
    # are read from their own objects.
    seg1, _ = where[engine.catalogue.latest_backup("1").archive_sha256]
    _put(s3, seg1.key, b"not the segment" * 100)
    lines: list[str] = []
    target2 = make_database()
    report2 = disaster.restore_all(engine, platform["replicas"], target2, s3_only(), progress=lines.append)
    assert report2.complete, report2.lines()
    assert table_sums(target2) == platform["expected"]
    assert report2.from_pack < WEDDINGS
    assert any(f"DR pack segment {seg1.sha256[:12]}" in line and "not used" in line for line in lines), lines


def test_an_index_that_is_not_json_or_not_its_name_is_passed_over(platform, make_database):
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    built = pack_build.build_pack(engine, {"s3": s3})
    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    garbage = b"{not json"
    _put(s3, packs.index_key(s3, packs.stamp_of(later), hashlib.sha256(garbage).hexdigest()), garbage)
    _put(s3, packs.index_key(s3, packs.stamp_of(later + timedelta(seconds=1)), "0" * 64), b'{"format": 1}')
    pack, notes = packs.newest_pack(s3)
    assert pack is not None and pack.index_key == built.published["s3"]
    assert len(notes) == 2 and "Expecting property name" in notes[1] and "sha256" in notes[0].lower(), notes
    target = make_database()
    report = disaster.restore_all(engine, platform["replicas"], target, s3_only())
    assert report.complete and report.from_pack == WEDDINGS, report.lines()
    assert sum("DR pack not used" in line for line in report.pack_notes) == 2 and not report.fallbacks
    assert table_sums(target) == platform["expected"]
    # Packs off: every wedding from its own object.
    target2 = make_database()
    plain = disaster.restore_all(engine, platform["replicas"], target2, s3_only(packs=False))
    assert plain.complete and plain.from_pack == 0 and not plain.pack


def test_pruning_keeps_the_newest_two_and_spares_young_segments(platform):
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    for _ in range(3):
        assert pack_build.build_pack(engine, {"s3": s3}).ok
    assert len(_index_keys(s3)) == 2  # each build pruned beyond the newest two
    stray = packs.segment_key(s3, "a" * 64)  # a dead build's segment: referenced by no index
    _put(s3, stray, b"left by a build that died")
    assert packs.prune(s3) == 0 and _get(s3, stray)  # young: a build may still be writing its index
    assert packs.prune(s3, now=datetime.now(timezone.utc) + timedelta(hours=2)) == 1
    assert stray not in {o.key for o in s3.list(f"{packs.PACK_DIR}/")}
    pack, _ = packs.newest_pack(s3)
    listed = {o.key for o in s3.list(f"{packs.PACK_DIR}/{packs.SEGMENT_DIR}/")}
    assert {s.key for s in pack.segments} <= listed


def test_an_erased_weddings_packs_are_forgotten(platform, make_database):
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    pack_build.build_pack(engine, {"s3": s3})
    pack, _ = packs.newest_pack(s3)
    holding = [s.key for s in pack.segments if any(e.partition == "4" for e in s.entries)]
    deleted = packs.forget_wedding(s3, "4")
    assert pack.index_key in deleted and set(holding) <= set(deleted)
    left = {o.key for o in s3.list(f"{packs.PACK_DIR}/")}
    assert not (set(deleted) & left)
    assert packs.newest_pack(s3) == (None, [])
    target = make_database()
    report = disaster.restore_all(engine, platform["replicas"], target, s3_only())
    assert report.complete and report.from_pack == 0, report.lines()


def test_a_pack_built_without_a_usable_copy_leaves_the_wedding_to_its_own_objects(platform):
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    backup = engine.catalogue.latest_backup("5")  # on S3 only, and the vault is lost
    own = next(c for c in engine.catalogue.copies(backup.id) if c.provider == "s3")
    _put(s3, own.object_key, b"damaged")
    built = pack_build.build_pack(engine, {"s3": s3})
    assert built.ok and built.weddings == WEDDINGS - 1 and set(built.left_out) == {"5"}
    assert "no copy could be packed" in built.left_out["5"] and "s3" in built.left_out["5"]
    assert any("left to its own objects: wedding 5" in line for line in built.lines())


def test_a_catalogue_lost_drill_reads_the_pack_checked_against_the_rebuilt_catalogue(platform):
    """The drill's catalogue-lost scenario: the catalogue rebuilt from S3's own objects alone, the weddings
    read from the pack — each archive checked against the SHA-256 the rebuilt catalogue took from S3's
    content-addressed keys, not from anything in the pack."""
    from wedbackup_dagster.core.keys.backup import back_up_key_store

    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    back_up_key_store(engine.settings, engine.catalogue, {"s3": s3}, engine.keyring)
    assert pack_build.build_pack(engine, {"s3": s3}).ok
    result = disaster.drill(engine, platform["replicas"], "s3", jobs=2, catalogue_lost=True)
    assert result.complete and result.catalogue_rebuilt, result.restore.lines()
    assert result.restore.from_pack == WEDDINGS and result.restore.pack.startswith("s3:")
    assert f"- DR pack: {result.restore.pack}, {WEDDINGS} wedding(s) read from it" in result.markdown()


def test_a_pack_of_an_earlier_time_is_named_by_when_it_was_built(platform):
    """Archives chosen as of a time before two newer packs were built: the index is named by the build's own
    time, so it is the newest and pruning keeps it (named by `as_of`, it sorted oldest and was pruned at once)."""
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    newest_backup = max(engine.catalogue.latest_backup(w).snapshot_time for w in platform["weddings"])
    as_of = newest_backup + timedelta(microseconds=1)  # every wedding's archive, at a time before the packs below
    for _ in range(2):
        assert pack_build.build_pack(engine, {"s3": s3}).ok
    built = pack_build.build_pack(engine, {"s3": s3}, as_of=as_of)
    assert built.ok and built.weddings == WEDDINGS and built.as_of == as_of.isoformat(), built.lines()
    assert built.created_at > built.as_of and built.published["s3"] in _index_keys(s3) and len(_index_keys(s3)) == 2
    pack, _ = packs.newest_pack(s3)
    assert pack.index_key == built.published["s3"] and pack.created_at == built.as_of


def test_indexes_stamped_in_the_future_never_prune_the_one_just_published(platform):
    """Two indexes stamped a century ahead (a clock gone wrong, or planted): the build's own index is kept."""
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    first = pack_build.build_pack(engine, {"s3": s3})
    document = _get(s3, first.published["s3"])
    for year in (2098, 2099):
        _put(s3, packs.index_key(s3, packs.stamp_of(datetime(year, 1, 1, tzinfo=timezone.utc)),
                                 hashlib.sha256(document).hexdigest()), document)
    built = pack_build.build_pack(engine, {"s3": s3})
    assert built.ok and built.published["s3"] in _index_keys(s3), (built.lines(), _index_keys(s3))


def test_one_build_at_a_time(platform):
    import psycopg

    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    with psycopg.connect(engine.settings.catalogue_dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('wedbackup-dr-pack'))")
        with pytest.raises(WedbackupError, match="another DR pack build is running"):
            pack_build.build_pack(engine, {"s3": s3})
    assert _index_keys(s3) == [] and pack_build.build_pack(engine, {"s3": s3}).ok


def test_a_wedding_erased_while_a_pack_is_built_never_appears_in_it(platform, monkeypatch):
    """Wedding 3 erased after the build chose its archive: the pack is not published (checked before the index
    is written), the segment holding it deleted."""
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    real, chosen = engine.catalogue.erased_partitions, []
    real_choose = pack_build.chosen_points

    def choose(*args, **kwargs):
        out = real_choose(*args, **kwargs)
        chosen.append(True)
        return out

    monkeypatch.setattr(pack_build, "chosen_points", choose)
    monkeypatch.setattr(engine.catalogue, "erased_partitions", lambda: real() | ({"3"} if chosen else set()))
    built = pack_build.build_pack(engine, {"s3": s3})
    assert not built.ok and "wedding(s) 3 erased while the pack was built" in built.failed["s3"], built.lines()
    assert _index_keys(s3) == []
    # the segment that held wedding 3 is gone; the others stay (a later build finds them in place)
    assert len(list(s3.list(f"{packs.PACK_DIR}/{packs.SEGMENT_DIR}/"))) == built.segments - 1


def test_a_wedding_erased_as_the_index_is_written_takes_the_index_with_it(platform, monkeypatch):
    """The erasure lands between the check before the index is written and the one after: the index goes."""
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    answers = iter([set(), {"3"}])
    monkeypatch.setattr(pack_build, "_erased_in", lambda engine, segments: next(answers))
    built = pack_build.build_pack(engine, {"s3": s3})
    assert not built.ok and "wedding(s) 3 erased while the pack was built" in built.failed["s3"]
    assert _index_keys(s3) == [] and packs.newest_pack(s3) == (None, [])


def test_pruning_deletes_a_damaged_index_and_nothing_while_the_provider_fails_to_answer(platform, monkeypatch):
    from wedbackup_dagster.core.errors import ReplicaError

    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    built = pack_build.build_pack(engine, {"s3": s3})
    stray = packs.segment_key(s3, "b" * 64)
    _put(s3, stray, b"old")
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    # The provider fails to answer for an index: what the kept packs reference is unknown, nothing is deleted.
    real = s3.download

    def failing(key, dest, **kw):
        if "/index/" in key:
            raise ReplicaError("s3", key, "connection reset")
        return real(key, dest, **kw)

    monkeypatch.setattr(s3, "download", failing)
    with pytest.raises(ReplicaError, match="connection reset"):
        packs.prune(s3, now=later)
    monkeypatch.setattr(s3, "download", real)
    assert _get(s3, stray) and _index_keys(s3) == [built.published["s3"]]
    # A damaged index (its bytes not JSON, its name their SHA-256) is deleted, and the old stray segment with it.
    garbage = b"{not json"
    damaged = packs.index_key(s3, packs.stamp_of(datetime.now(timezone.utc) + timedelta(minutes=1)),
                              hashlib.sha256(garbage).hexdigest())
    _put(s3, damaged, garbage)
    assert packs.prune(s3, now=later) == 2
    assert _index_keys(s3) == [built.published["s3"]] and stray not in {o.key for o in s3.list(f"{packs.PACK_DIR}/")}


def test_forgetting_a_wedding_deletes_every_segment_no_index_references(platform):
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    assert pack_build.build_pack(engine, {"s3": s3}).ok
    stray = packs.segment_key(s3, "c" * 64)  # a crashed build's segment, young: it may hold the wedding
    _put(s3, stray, b"a crashed build's")
    deleted = packs.forget_wedding(s3, "4")
    assert stray in deleted and not {o.key for o in s3.list(f"{packs.PACK_DIR}/")}


def test_an_index_document_round_trips_through_its_checks(platform):
    s3 = platform["replicas"]["s3"]
    seg = packs.Segment(packs.segment_key(s3, "d" * 64), "d" * 64, 20,
                        (packs.Entry("1", "a" * 64, 0, 10), packs.Entry("2", "b" * 64, 10, 10)))
    doc = packs.index_document("now", [seg])
    assert json.loads(doc)["segments"][0]["entries"][1] == ["2", "b" * 64, 10, 10]
    overlapping = doc.replace(b'"b' + b"b" * 63 + b'",10', b'"b' + b"b" * 63 + b'",5')
    key = packs.index_key(s3, packs.stamp_of(datetime.now(timezone.utc)), hashlib.sha256(overlapping).hexdigest())
    _put(s3, key, overlapping)
    pack, notes = packs.newest_pack(s3)
    assert pack is None and "outside its segment or overlaps another" in notes[0], notes


def test_an_index_larger_than_an_index_may_be_is_not_read(platform, monkeypatch):
    engine, s3 = platform["engine"], platform["replicas"]["s3"]
    built = pack_build.build_pack(engine, {"s3": s3})
    size = len(_get(s3, built.published["s3"]))
    monkeypatch.setattr(packs, "INDEX_MAX_BYTES", size - 1)
    pack, notes = packs.newest_pack(s3)
    assert pack is None and f"has {size:,} bytes, more than the {size - 1:,}" in notes[0], notes
