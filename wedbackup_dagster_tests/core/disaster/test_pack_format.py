"""DR packs' format, pure (core/disaster/packs.py; no stack): an index parsed with every value of the wrong type
or range refused with a PackIndexError naming the index (never another exception: restore --all, the build's
pruning and an erasure all read indexes a stranger could have written); `plan` serves a wedding only the
archive it chose; segment boundaries depend on the wedding alone; an archive cut from a segment is checked
against the expected SHA-256."""
from __future__ import annotations

import hashlib
import io
import json
from types import SimpleNamespace

import pytest

from wedbackup_dagster.core.disaster import packs
from wedbackup_dagster.core.errors import ArchiveError

REPLICA = SimpleNamespace(provider="s3", prefix="wedbackup")
A, B, C, D = "a" * 64, "b" * 64, "c" * 64, "d" * 64


def _doc(**segment) -> dict:
    seg = {"key": packs.segment_key(REPLICA, D), "sha256": D, "size": 20,
           "entries": [["1", A, 0, 10], ["2", B, 10, 10]], **segment}
    return {"format": 1, "created_at": "now", "segments": [seg]}


def _parse(doc) -> packs.Pack:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return packs.parse_index(REPLICA, "wedbackup/dr-packs/index/x.json", data)


def test_a_well_formed_index_parses():
    pack = _parse(_doc())
    assert pack.provider == "s3" and pack.created_at == "now"
    assert pack.locate()[B] == (pack.segments[0], packs.Entry("2", B, 10, 10))
    assert _parse(json.loads(packs.index_document("now", list(pack.segments)))) == pack


@pytest.mark.parametrize("doc, why", [
    (b"[1, 2]", "not a JSON object"),
    (b"{not json", "Expecting property name"),
    (b"[" * 100_000 + b"]" * 100_000, ""),  # nesting past the parser's recursion limit
    ({"format": True, "created_at": "now", "segments": []}, "format"),
    ({"format": 2, "created_at": "now", "segments": []}, "format"),
    ({"format": 1, "created_at": "now", "segments": {}}, "no list of segments"),
    (_doc(size=True), "segment size"),
    (_doc(size=-1), "segment size"),
    (_doc(size=1 << 70), "segment size"),
    (_doc(size=20.0), "segment size"),
    (_doc(entries=[["1", A, False, 10]]), "offset"),
    (_doc(entries=[["1", A, 0, -10]]), "length"),
    (_doc(entries=[["1", A, 10 ** 26, 10]]), "offset"),
    (_doc(entries=[["1", A, 5, 10], ["2", B, 10, 10]]), "overlaps another"),
    (_doc(entries=[["1", A, 10, 10], ["2", B, 0, 10]]), "overlaps another"),
    (_doc(entries=[["1", A, 15, 10]]), "outside its segment"),
    (_doc(entries=[["../1", A, 0, 10]]), "malformed"),
    (_doc(entries=[["1", "A" * 64, 0, 10]]), "malformed"),
    (_doc(entries=[["1", A, 0]]), ""),
    (_doc(key="wedbackup/weddings/1/" + D + ".wbk"), "content address"),
])
def test_every_malformed_index_is_a_pack_index_error_naming_it(doc, why):
    with pytest.raises(packs.PackIndexError, match="DR pack index wedbackup/dr-packs/index/x.json") as err:
        _parse(doc)
    assert why in str(err.value)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_json_constants_are_no_numbers_of_an_index(constant):
    data = json.dumps(_doc()).encode().replace(b'"size": 20', b'"size": ' + constant)
    with pytest.raises(packs.PackIndexError, match="is not a number an index holds"):
        _parse(data)


def test_a_segment_listed_twice_is_refused():
    doc = _doc()
    doc["segments"].append(dict(doc["segments"][0]))
    with pytest.raises(packs.PackIndexError, match="listed twice"):
        _parse(doc)


def _point(partition: str, sha: str):
    return SimpleNamespace(partition=partition, archive_sha256=sha)


def test_plan_serves_a_wedding_only_the_archive_it_chose():
    seg = packs.Segment("k", D, 30, (packs.Entry("1", A, 0, 10), packs.Entry("2", B, 10, 10),
                                     packs.Entry("3", C, 20, 10)))
    pack = packs.Pack("s3", "i", "now", (seg,))
    points = [_point("1", A), _point("2", "e" * 64), _point("9", C), _point("4", "f" * 64)]
    segments, rest = packs.plan(pack, points)
    assert [(s.sha256, [p.partition for p, _ in served]) for s, served in segments] == [(D, ["1"])]
    assert [p.partition for p in rest] == ["2", "9", "4"]  # newer archive; another wedding's entry; not packed


def test_segment_boundaries_depend_on_the_wedding_alone():
    ends = [w for w in map(str, range(1, 2001)) if packs.ends_segment(w)]
    assert 30 <= len(ends) <= 110  # about one wedding in BOUNDARY_EVERY (32)
    assert ends == [w for w in map(str, range(1, 2001)) if packs.ends_segment(w)]


def test_an_archive_cut_from_a_segment_is_checked_against_the_expected_digest():
    segment = io.BytesIO(b"0123456789" + b"archive two")
    entry = packs.Entry("2", B, 10, 11)
    with packs.archive_from(segment, entry, hashlib.sha256(b"archive two").hexdigest(), "w2") as tmp:
        assert tmp.read() == b"archive two"
    with pytest.raises(ArchiveError, match="do not match the catalogue's SHA-256"):
        with packs.archive_from(segment, entry, A, "w2"):
            pass
    with pytest.raises(ArchiveError, match="ended before the archive did"):
        with packs.archive_from(segment, packs.Entry("2", B, 15, 11), A, "w2"):
            pass
