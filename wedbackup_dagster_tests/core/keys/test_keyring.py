"""Tests for the key primitives: SecretKey, the master keyring loaded from the environment, key wrapping."""
from __future__ import annotations

import base64

import pytest

from wedbackup_dagster.core.errors import ConfigError, CryptoKeyError
from wedbackup_dagster.core.keys.keyring import (MasterKeyring, SecretKey, WRAPPED_KEY_BYTES, generate_master_key_text,
                                                 load_master_keyring, new_data_key, unwrap_key, wrap_key)

MATERIAL = bytes(range(100, 132))
B64 = base64.b64encode(MATERIAL).decode()


def secret_forms(material: bytes) -> list[str]:
    return [material.hex(), base64.b64encode(material).decode(), repr(material)[2:-1], material.decode("latin-1")]


def assert_hides(text: str, material: bytes) -> None:
    for form in secret_forms(material):
        assert form not in text


def assert_no_fragment(message: str, secret_text: str, width: int = 6) -> None:
    """No run of `width` characters of the secret text appears in the message."""
    if not secret_text:
        return
    for i in range(max(1, len(secret_text) - width + 1)):
        fragment = secret_text[i : i + width]
        assert fragment not in message, f"error message leaks {fragment!r}"


# SecretKey


def test_secret_key_repr_and_str_show_only_the_id():
    key = SecretKey("wedding-42.v1", MATERIAL)
    for text in (repr(key), str(key), f"{key}", repr([key]), repr({"k": key})):
        assert "wedding-42.v1" in text
        assert_hides(text, MATERIAL)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_secret_key_rejects_wrong_length(size):
    with pytest.raises(CryptoKeyError, match="expected 32"):
        SecretKey("k1", b"\x07" * size)


@pytest.mark.parametrize("key_id", ["", "has space", "x" * 65, "colon:id", "slash/id", "ünïcode", 12])
def test_secret_key_rejects_bad_ids(key_id):
    with pytest.raises(CryptoKeyError, match="invalid key id"):
        SecretKey(key_id, MATERIAL)


def test_secret_key_copies_mutable_material():
    source = bytearray(MATERIAL)
    key = SecretKey("k1", source)
    source[0] ^= 0xFF
    assert key.material == MATERIAL and isinstance(key.material, bytes)


def test_secret_key_generate_is_random():
    a, b = SecretKey.generate("a"), SecretKey.generate("a")
    assert len(a.material) == 32 and a.material != b.material


# Master keyring


def test_keyring_current_get_and_ids():
    k1, k2 = SecretKey("new", MATERIAL), SecretKey("old", bytes(32))
    ring = MasterKeyring([k1, k2])
    assert ring.current is k1
    assert ring.get("old") is k2
    assert ring.key_ids == ("new", "old")
    assert "old" in ring and len(ring) == 2
    assert_hides(repr(ring), MATERIAL)


def test_keyring_unknown_id_names_the_id_not_the_material():
    ring = MasterKeyring([SecretKey("k1", MATERIAL)])
    with pytest.raises(CryptoKeyError) as info:
        ring.get("nope")
    assert "'nope'" in str(info.value) and "k1" in str(info.value)
    assert_hides(str(info.value), MATERIAL)


def test_keyring_rejects_empty_and_duplicates():
    with pytest.raises(CryptoKeyError):
        MasterKeyring([])
    with pytest.raises(CryptoKeyError, match="more than once"):
        MasterKeyring([SecretKey("a", MATERIAL), SecretKey("a", bytes(32))])


# load_master_keyring


def test_load_single_key_from_env():
    ring = load_master_keyring({"WEDBACKUP_MASTER_KEY": f"prod-2024:{B64}"})
    assert ring.key_ids == ("prod-2024",)
    assert ring.current.material == MATERIAL


def test_load_several_keys_first_is_current():
    other = base64.b64encode(bytes(32)).decode()
    ring = load_master_keyring({"WEDBACKUP_MASTER_KEY": f" new:{B64} , old.1:{other} "})
    assert ring.current.key_id == "new"
    assert ring.get("old.1").material == bytes(32)
    assert ring.key_ids == ("new", "old.1")


def test_load_from_file(tmp_path):
    other = base64.b64encode(bytes(32)).decode()
    path = tmp_path / "master.key"
    path.write_text(f"k_a:{B64}\nk_b:{other}\n")
    ring = load_master_keyring({"WEDBACKUP_MASTER_KEY_FILE": str(path)})
    assert ring.key_ids == ("k_a", "k_b")
    assert ring.current.material == MATERIAL


def test_empty_inline_value_falls_back_to_file(tmp_path):
    path = tmp_path / "master.key"
    path.write_text(f"k1:{B64}")
    ring = load_master_keyring({"WEDBACKUP_MASTER_KEY": "", "WEDBACKUP_MASTER_KEY_FILE": str(path)})
    assert ring.current.key_id == "k1"


def test_generated_text_loads_back():
    text = generate_master_key_text("demo")
    key_id, _, b64 = text.partition(":")
    assert key_id == "demo" and len(base64.b64decode(b64)) == 32
    ring = load_master_keyring({"WEDBACKUP_MASTER_KEY": text})
    assert ring.current.key_id == "demo"
    assert generate_master_key_text("demo") != text


def test_generate_rejects_bad_id():
    with pytest.raises(CryptoKeyError):
        generate_master_key_text("bad id")


def test_missing_configuration():
    with pytest.raises(ConfigError) as info:
        load_master_keyring({})
    assert info.value.variable == "WEDBACKUP_MASTER_KEY"
    assert "WEDBACKUP_MASTER_KEY_FILE" in str(info.value)


def test_both_variables_set_is_an_error(tmp_path):
    path = tmp_path / "k"
    path.write_text(f"k1:{B64}")
    with pytest.raises(ConfigError, match="set only one") as info:
        load_master_keyring({"WEDBACKUP_MASTER_KEY": f"k1:{B64}", "WEDBACKUP_MASTER_KEY_FILE": str(path)})
    assert_no_fragment(str(info.value), B64)


def test_empty_or_binary_key_file(tmp_path):
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_master_keyring({"WEDBACKUP_MASTER_KEY_FILE": str(empty)})
    binary = tmp_path / "binary.key"
    binary.write_bytes(MATERIAL)
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_master_keyring({"WEDBACKUP_MASTER_KEY_FILE": str(binary)})
    assert_hides(str(info.value), MATERIAL)


def test_unreadable_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.key"
    with pytest.raises(ConfigError) as info:
        load_master_keyring({"WEDBACKUP_MASTER_KEY_FILE": str(missing)})
    assert str(missing) in str(info.value) and "cannot read" in str(info.value)


MALFORMED = {
    "no colon": B64,
    "bad base64": "k1:" + "!" * 44,
    "base64 with a stray char": "k1:" + B64[:20] + "*" + B64[21:],
    "too short": "k1:" + base64.b64encode(MATERIAL[:31]).decode(),
    "too long": "k1:" + base64.b64encode(MATERIAL + b"\x01").decode(),
    "bad id": "bad id:" + B64,
    "empty id": ":" + B64,
    "id too long": "x" * 65 + ":" + B64,
    "swapped halves": B64 + ":k1",
    "unpadded base64 swapped": B64.rstrip("=") + ":" + "k1",
    "empty": "   ",
    "only commas": ",,,",
    "duplicate ids": f"k1:{B64},k1:{base64.b64encode(bytes(32)).decode()}",
    "second entry broken": f"k1:{B64},k2:{B64[:-6]}",
    "unicode garbage": "k1:" + "é" * 44,
}


@pytest.mark.parametrize("value", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_inline_value_never_leaks(value):
    with pytest.raises(ConfigError) as info:
        load_master_keyring({"WEDBACKUP_MASTER_KEY": value})
    err = info.value
    assert err.variable == "WEDBACKUP_MASTER_KEY"
    for text in (str(err), repr(err)):
        assert_no_fragment(text, value.replace(" ", "").replace(",", ""))
        assert_hides(text, MATERIAL)
    # A chained exception would print below ours in a traceback: it must be hidden and harmless.
    assert err.__cause__ is None
    if err.__context__ is not None:
        assert err.__suppress_context__
        assert_no_fragment(str(err.__context__), value)


NON_BLANK = {k: v for k, v in MALFORMED.items() if v.strip(" ,")}


@pytest.mark.parametrize("value", list(NON_BLANK.values()), ids=list(NON_BLANK))
def test_malformed_file_content_never_leaks(tmp_path, value):
    path = tmp_path / "master.key"
    path.write_text(value + "\n")
    with pytest.raises(ConfigError) as info:
        load_master_keyring({"WEDBACKUP_MASTER_KEY_FILE": str(path)})
    assert str(path) in str(info.value)
    assert_no_fragment(str(info.value).replace(str(path), ""), value)


def test_malformed_message_says_what_is_wrong():
    cases = {
        "k1:" + "!" * 44: "not valid base64",
        "k1:" + base64.b64encode(MATERIAL[:31]).decode(): "31 bytes, expected exactly 32",
        "bad id:" + B64: "key id",
        B64: "KEYID:BASE64",
    }
    for value, expected in cases.items():
        with pytest.raises(ConfigError, match=expected):
            load_master_keyring({"WEDBACKUP_MASTER_KEY": value})


# wrap / unwrap

KEK = SecretKey("master-1", MATERIAL)


def test_wrap_round_trip_and_layout():
    data_key = new_data_key()
    wrapped = wrap_key(KEK, data_key, b"wedding:123")
    assert len(wrapped) == WRAPPED_KEY_BYTES == 61 and wrapped[0] == 1
    assert data_key not in wrapped
    assert unwrap_key(KEK, wrapped, b"wedding:123") == data_key
    assert wrap_key(KEK, data_key, b"wedding:123") != wrapped  # fresh nonce every time


def test_unwrap_with_wrong_context_fails():
    wrapped = wrap_key(KEK, new_data_key(), b"wedding:123")
    with pytest.raises(CryptoKeyError, match="does not open.*wrong master key or tampered wrapped key"):
        unwrap_key(KEK, wrapped, b"wedding:124")


def test_unwrap_with_wrong_kek_fails_without_leaking():
    data_key = new_data_key()
    wrapped = wrap_key(KEK, data_key, b"wedding:1")
    other = SecretKey("master-2", bytes(32))
    with pytest.raises(CryptoKeyError) as info:
        unwrap_key(other, wrapped, b"wedding:1")
    message = str(info.value)
    assert "master-2" in message and "wedding:1" in message
    assert_hides(message, data_key)
    assert_hides(message, MATERIAL)
    assert_hides(message, bytes(32))


def test_every_tampered_byte_is_detected():
    data_key = new_data_key()
    wrapped = wrap_key(KEK, data_key, b"ctx")
    for i in range(len(wrapped)):
        bad = bytearray(wrapped)
        bad[i] ^= 0x01
        with pytest.raises(CryptoKeyError):
            unwrap_key(KEK, bytes(bad), b"ctx")
    for bad in (wrapped[:-1], wrapped + b"\x00", b"", b"\x02" + wrapped[1:]):
        with pytest.raises(CryptoKeyError):
            unwrap_key(KEK, bad, b"ctx")


def test_wrap_only_accepts_32_byte_keys():
    with pytest.raises(CryptoKeyError, match="32-byte"):
        wrap_key(KEK, b"short", b"ctx")


def test_new_data_key():
    a, b = new_data_key(), new_data_key()
    assert len(a) == 32 and a != b
