"""Secrecy of card codes: AEAD encryption at rest and keyed fingerprints for dedupe.

A stored code is ``key_id (1 byte) || nonce (12) || AES-256-GCM(secret, aad)``; the
AAD binds it to its SKU, so a ciphertext moved to another pool fails to decrypt.
The key id lets old keys keep decrypting after a rotation.

Fingerprints are keyed ``BLAKE2b(code, key=fingerprint_key, digest_size=16)``. The fingerprint key is
random, made once per deployment and stored in Redis wrapped (encrypted) under the
master key, so rotating the master key never changes a fingerprint.

Imports go through the compiled core (``Fingerprints``, ``seal``), which computes the
same values a chunk at a time; the methods here are their reference.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
from hashlib import blake2b
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._core import Fingerprints, Opener, seal
from .config import Config
from .errors import ConfigError, DispatchError

__all__ = ["Vault", "load_master_keys"]

log = logging.getLogger("dispatch.vault")

_NONCE = 12
_FPKEY_AAD = b"card-dispatch fingerprint key"
MASTER_KEY_FILE = "master.key"


def _decode_key(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what} is not valid base64") from None
    if len(raw) != 32:
        raise ConfigError(f"{what} must be base64 of 32 bytes, got {len(raw)} bytes")
    return raw


def load_master_keys(config: Config) -> list[bytes]:
    """The master keys, current first: from config, else from (or generated into) the data dir."""
    if config.master_key:
        current = _decode_key(config.master_key, "master_key (DISPATCH_MASTER_KEY)")
    else:
        path = Path(config.data_dir) / MASTER_KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
            log.warning("no master_key configured: generated one into %s; back it up, "
                        "without it no stored code can be read", path)
        current = _decode_key(path.read_text(), f"master key file {path}")
    old = [_decode_key(k, "old_master_keys entry") for k in config.old_master_keys]
    return [current, *old]


class Vault:
    """Encrypts, decrypts and fingerprints codes with the deployment's keys."""

    __slots__ = ("_current_id", "_current", "_current_key", "_openers", "_fp_key")

    def __init__(self, master_keys: list[bytes], fingerprint_key: bytes | None = None) -> None:
        if not master_keys:
            raise ConfigError("at least one master key is needed")
        # each code shown is decrypted: by the core, its key schedule set up once a key
        self._openers: dict[int, Opener] = {}
        for key in master_keys:
            kid = self.key_id(key)
            if kid in self._openers:
                raise ConfigError("two master keys share a key id; generate another key")
            self._openers[kid] = Opener(key)
        self._current_id = self.key_id(master_keys[0])
        self._current = AESGCM(master_keys[0])
        self._current_key = master_keys[0]
        self._fp_key = fingerprint_key

    @staticmethod
    def key_id(key: bytes) -> int:
        return hashlib.sha256(b"card-dispatch key id" + key).digest()[0]

    # ---- codes ---------------------------------------------------------------
    def encrypt(self, secret: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return bytes((self._current_id,)) + nonce + self._current.encrypt(nonce, secret, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        opener = self._openers.get(blob[0]) if blob else None
        if opener is None:
            raise DispatchError("a stored code was encrypted with a key that is not configured "
                                "(add it to old_master_keys)")
        try:
            return opener.open(blob, 1, aad)
        except ValueError:
            raise DispatchError("a stored code failed authentication (wrong key or tampered data)") from None

    # ---- fingerprints --------------------------------------------------------
    def wrap_fingerprint_key(self, key: bytes) -> bytes:
        return self.encrypt(key, _FPKEY_AAD)

    def unwrap_fingerprint_key(self, wrapped: bytes) -> bytes:
        return self.decrypt(wrapped, _FPKEY_AAD)

    def set_fingerprint_key(self, wrapped: bytes) -> None:
        self._fp_key = self.unwrap_fingerprint_key(wrapped)

    def fingerprint(self, code: bytes) -> bytes:
        if self._fp_key is None:
            raise DispatchError("fingerprint key not loaded (engine not started)")
        # keyed BLAKE2b is a PRF like HMAC, at a fraction of its cost per call
        return blake2b(code, key=self._fp_key, digest_size=16).digest()

    def fingerprints(self) -> Fingerprints:
        """A fresh :class:`~dispatch._core.Fingerprints` of the fingerprint key: what one
        import fingerprints its codes with and remembers them in."""
        if self._fp_key is None:
            raise DispatchError("fingerprint key not loaded (engine not started)")
        return Fingerprints(self._fp_key)

    def encrypt_chunk(self, secrets_: bytes, ends: bytes, keep: bytes | None, aad: bytes) -> list[bytes]:
        """:meth:`encrypt` of each secret packed in *secrets_* (ending at the uint32
        offsets *ends*) whose *keep* flag is set (all when None), in the core."""
        kept = len(ends) // 4 if keep is None else len(keep) - keep.count(0)
        return seal(self._current_key, self._current_id, aad, secrets_, ends, keep, os.urandom(_NONCE * kept))
