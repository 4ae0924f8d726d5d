"""Key primitives: the 32-byte secret key type, the master keyring loaded from the environment, and
AES-256-GCM key wrapping for the master key -> wedding key -> archive data key hierarchy."""
from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from wedbackup_dagster.core.errors import ConfigError, CryptoKeyError

KEY_BYTES = 32
KEY_ID_PATTERN = r"[A-Za-z0-9._-]{1,64}"
_KEY_ID_RE = re.compile(KEY_ID_PATTERN + r"\Z")

MASTER_KEY_ENV = "WEDBACKUP_MASTER_KEY"
MASTER_KEY_FILE_ENV = "WEDBACKUP_MASTER_KEY_FILE"

WRAP_VERSION = 1
_NONCE_BYTES = 12
_TAG_BYTES = 16
WRAPPED_KEY_BYTES = 1 + _NONCE_BYTES + KEY_BYTES + _TAG_BYTES


def is_valid_key_id(key_id: object) -> bool:
    # Key ids end up in archive headers, log lines and file names, so they are kept to a boring alphabet.
    return isinstance(key_id, str) and _KEY_ID_RE.match(key_id) is not None


@dataclass(frozen=True, repr=False)
class SecretKey:
    """A named 32-byte AES-256 key. Its repr and str show the key id only, so it is safe to log."""

    key_id: str
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not is_valid_key_id(self.key_id):
            raise CryptoKeyError(f"invalid key id {repr(self.key_id)[:80]}: "
                                 "expected 1-64 characters of A-Z a-z 0-9 . _ -")
        if not isinstance(self.material, (bytes, bytearray, memoryview)):
            raise CryptoKeyError(f"key {self.key_id}: material must be bytes")
        material = bytes(self.material)
        if len(material) != KEY_BYTES:
            raise CryptoKeyError(f"key {self.key_id}: material is {len(material)} bytes, expected {KEY_BYTES}")
        # A caller's bytearray could be mutated after the fact; keep our own immutable copy.
        object.__setattr__(self, "material", material)

    def __repr__(self) -> str:
        return f"SecretKey(key_id={self.key_id!r})"

    __str__ = __repr__

    @classmethod
    def generate(cls, key_id: str) -> "SecretKey":
        return cls(key_id, os.urandom(KEY_BYTES))


class MasterKeyring:
    """The master keys (KEKs) this process knows. `current` wraps new keys; older ones still unwrap."""

    def __init__(self, keys: Iterable[SecretKey]):
        keys = tuple(keys)
        if not keys:
            raise CryptoKeyError("a master keyring needs at least one key")
        by_id: dict[str, SecretKey] = {}
        for key in keys:
            if not isinstance(key, SecretKey):
                raise CryptoKeyError("master keyring entries must be SecretKey instances")
            if key.key_id in by_id:
                raise CryptoKeyError(f"master key id {key.key_id!r} appears more than once")
            by_id[key.key_id] = key
        self._keys = by_id
        self._current = keys[0]

    @property
    def current(self) -> SecretKey:
        return self._current

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def get(self, key_id: str) -> SecretKey:
        try:
            return self._keys[key_id]
        except (KeyError, TypeError):
            raise CryptoKeyError(
                f"master key {key_id!r} is not in the keyring (known ids: {', '.join(self._keys)})"
            ) from None

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"MasterKeyring(current={self._current.key_id!r}, key_ids={self.key_ids!r})"


def _config_error(problem: str) -> ConfigError:
    return ConfigError(MASTER_KEY_ENV, problem)


def _parse_keyring_text(text: str, source: str) -> MasterKeyring:
    # Error messages identify entries by position only: a malformed entry may be the secret itself
    # (e.g. the two halves swapped), so no part of the text is ever echoed back.
    entries = [e.strip() for e in re.split(r"[,\r\n]", text)]
    entries = [e for e in entries if e]
    if not entries:
        raise _config_error(f"{source} is empty; expected KEYID:BASE64 (create one with `wedbackup keys new`)")
    keys: list[SecretKey] = []
    seen: dict[str, int] = {}
    for position, entry in enumerate(entries, start=1):
        where = f"{source}, entry {position} of {len(entries)}"
        key_id, sep, b64 = entry.partition(":")
        key_id, b64 = key_id.strip(), b64.strip()
        if not sep:
            raise _config_error(f"{where}: not of the form KEYID:BASE64 (no ':' found)")
        if not is_valid_key_id(key_id):
            raise _config_error(f"{where}: the key id is not 1-64 characters of A-Z a-z 0-9 . _ -")
        try:
            material = base64.b64decode(b64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise _config_error(f"{where}: the key material is not valid base64") from None
        if len(material) != KEY_BYTES:
            raise _config_error(
                f"{where}: the key material decodes to {len(material)} bytes, expected exactly {KEY_BYTES}"
            )
        if key_id in seen:
            raise _config_error(f"{where}: repeats the key id of entry {seen[key_id]}")
        seen[key_id] = position
        keys.append(SecretKey(key_id, material))
    return MasterKeyring(keys)


def load_master_keyring(environ: Mapping[str, str]) -> MasterKeyring:
    """Master keys from WEDBACKUP_MASTER_KEY ("ID:BASE64[,ID:BASE64...]", first = current) or from the
    file named by WEDBACKUP_MASTER_KEY_FILE. Raises ConfigError, never quoting the secret."""
    inline = environ.get(MASTER_KEY_ENV, "")
    path = environ.get(MASTER_KEY_FILE_ENV, "")
    if inline.strip() and path.strip():
        raise _config_error(f"both {MASTER_KEY_ENV} and {MASTER_KEY_FILE_ENV} are set; set only one")
    if inline.strip():
        return _parse_keyring_text(inline, MASTER_KEY_ENV)
    if path.strip():
        path = path.strip()
        try:
            with open(path, "rb") as fh:
                raw = fh.read(64 * 1024 + 1)
        except OSError as exc:
            raise _config_error(
                f"{MASTER_KEY_FILE_ENV}={path}: cannot read the file ({exc.strerror or type(exc).__name__})"
            ) from None
        if len(raw) > 64 * 1024:
            raise _config_error(f"{MASTER_KEY_FILE_ENV}={path}: the file is too large to be a key file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _config_error(f"{MASTER_KEY_FILE_ENV}={path}: the file is not UTF-8 text") from None
        return _parse_keyring_text(text, f"{MASTER_KEY_FILE_ENV}={path}")
    raise _config_error(
        f"not set: set {MASTER_KEY_ENV}=KEYID:BASE64 or {MASTER_KEY_FILE_ENV}=/path/to/file "
        "(create a key with `wedbackup keys new`)"
    )


def generate_master_key_text(key_id: str) -> str:
    """Fresh `KEYID:BASE64` text for WEDBACKUP_MASTER_KEY."""
    key = SecretKey.generate(key_id)
    return f"{key.key_id}:{base64.b64encode(key.material).decode('ascii')}"


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


def wrap_key(kek: SecretKey, key: bytes, context: bytes) -> bytes:
    """Encrypt a 32-byte key under `kek`. `context` (e.g. b"wedding:123") is authenticated, so the
    wrapped key only opens for the same owner. Output: version(1) || nonce(12) || ciphertext+tag(48)."""
    if not isinstance(kek, SecretKey):
        raise CryptoKeyError("the wrapping key must be a SecretKey")
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise CryptoKeyError(f"only {KEY_BYTES}-byte keys can be wrapped, got {len(key)} bytes")
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(kek.material).encrypt(nonce, key, bytes(context))
    return bytes([WRAP_VERSION]) + nonce + sealed


def _describe_context(context: bytes) -> str:
    text = bytes(context)[:120].decode("utf-8", "replace")
    return repr(text)


def unwrap_key(kek: SecretKey, wrapped: bytes, context: bytes) -> bytes:
    """Inverse of wrap_key. Raises CryptoKeyError if the wrapped key does not open with `kek` for `context`."""
    if not isinstance(kek, SecretKey):
        raise CryptoKeyError("the wrapping key must be a SecretKey")
    wrapped = bytes(wrapped)
    if not wrapped:
        raise CryptoKeyError("wrapped key is empty")
    if wrapped[0] != WRAP_VERSION:
        raise CryptoKeyError(f"wrapped key has unsupported format version {wrapped[0]} "
                             f"(this build knows {WRAP_VERSION})")
    if len(wrapped) != WRAPPED_KEY_BYTES:
        raise CryptoKeyError(f"wrapped key is {len(wrapped)} bytes, expected {WRAPPED_KEY_BYTES}: damaged or truncated")
    nonce, sealed = wrapped[1 : 1 + _NONCE_BYTES], wrapped[1 + _NONCE_BYTES :]
    try:
        return AESGCM(kek.material).decrypt(nonce, sealed, bytes(context))
    except InvalidTag:
        raise CryptoKeyError(
            f"wrapped key (context {_describe_context(context)}) does not open with key {kek.key_id!r}: "
            "wrong master key or tampered wrapped key"
        ) from None
