"""Encrypted images (dump/restore --encrypt KEYFILE): AES-256-GCM.

A key file holds 32 random bytes, raw or as 64 hex digits (and a newline).
Every image (each process's of a tree) gets its own key, derived from the
key file's with HKDF-SHA256 and a random 32-byte salt stored in the clear,
so that the per-chunk nonces below never repeat under one key:

    what                nonce (12 bytes)         associated data
    procsnap.img body   "INV\\0" | 0 (u64)        the header and the CRYP record
    page chunk          "PAGE"  | n              CHUNK_AD: n, logical offset, length, method
                        (n: the number of its first page in the logical page space)
    ghosts.img blob     "GHST"  | its offset     its offset and size

A flipped bit, a chunk moved to another place or another image, a wrong
key: each fails the GCM tag (or the key check value, for a wrong key),
which the reader reports before any process is touched. The inventory's
records (the chunk table among them) are all inside the one sealed body,
so the table that says where each chunk is cannot be altered either.
"""

from __future__ import annotations

import os
import struct

from ..errors import ImageCorrupt, ImageError, ProcsnapError

CIPHER = "AES-256-GCM"
KDF = "HKDF-SHA256"
KEY_BYTES = 32
SALT_BYTES = 32
TAG_BYTES = 16
NONCE = struct.Struct("<4sQ")
CHUNK_AD = struct.Struct("<8sQQII")  # b"psnapchk", index, logical offset, length, method
BLOB_AD = struct.Struct("<8sQQ")  # b"psnapgst", offset, size
INFO_KEY = b"procsnap image key"
INFO_CHECK = b"procsnap key check"


class KeyFileError(ProcsnapError):
    """A key file that is missing or not a key."""


def read_key_file(path: str) -> bytes:
    """The 32-byte key in `path` (raw, or 64 hex digits)."""
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except FileNotFoundError as err:
        raise KeyFileError(f"key file {path}: no such file") from err
    except OSError as err:
        raise KeyFileError(f"key file {path}: cannot read: {err.strerror}") from err
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise KeyFileError(f"key file {path}: expected {KEY_BYTES} bytes or {2 * KEY_BYTES} hex digits, "
                       f"found {len(data)} bytes")


def _aead():
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as err:
        raise ImageError("encrypted images need the cryptography package: pip install 'procsnap[encrypt]'") from err
    return AESGCM


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of one 32-byte block: extract, then expand."""
    import hashlib  # only for encrypted images
    import hmac

    prk = hmac.new(salt, key, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


class Sealer:
    """One image's AEAD: its derived key, seal/open by nonce domain and index."""

    def __init__(self, master: bytes, salt: bytes | None = None):
        self.salt = os.urandom(SALT_BYTES) if salt is None else salt
        self.check = _hkdf(master, self.salt, INFO_CHECK)[:16]
        self.aead = _aead()(_hkdf(master, self.salt, INFO_KEY))

    def header(self) -> dict:
        """The CRYP record: what a reader needs, besides the key."""
        return {"cipher": CIPHER, "kdf": KDF, "salt": self.salt.hex(), "check": self.check.hex()}

    @classmethod
    def for_reading(cls, master: bytes | None, header: dict, where: str) -> "Sealer":
        if master is None:
            raise ImageError(f"{where}: the image is encrypted ({CIPHER}); give its key: --encrypt KEYFILE")
        if header.get("cipher") != CIPHER or header.get("kdf") != KDF:
            raise ImageCorrupt(f"{where}: CRYP record: cipher {header.get('cipher')!r} with "
                               f"{header.get('kdf')!r}, expected {CIPHER} with {KDF}")
        try:
            salt, check = bytes.fromhex(header["salt"]), bytes.fromhex(header["check"])
        except (KeyError, TypeError, ValueError) as err:
            raise ImageCorrupt(f"{where}: CRYP record: salt and check expected as hex") from err
        sealer = cls(master, salt)
        import hmac

        if not hmac.compare_digest(sealer.check, check):
            raise ImageError(f"{where}: wrong key: the key file is not the one this image was encrypted with")
        return sealer

    def seal(self, domain: bytes, index: int, data, ad: bytes) -> bytes:
        return self.aead.encrypt(NONCE.pack(domain, index), bytes(data) if isinstance(data, memoryview) else data, ad)

    def open(self, domain: bytes, index: int, data, ad: bytes, what: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return self.aead.decrypt(NONCE.pack(domain, index), data, ad)
        except InvalidTag as err:
            raise ImageCorrupt(f"{what}: authentication failed (altered, moved or truncated)") from err


def chunk_ad(index: int, offset: int, length: int, method: int) -> bytes:
    return CHUNK_AD.pack(b"psnapchk", index, offset, length, method)


def blob_ad(offset: int, size: int) -> bytes:
    return BLOB_AD.pack(b"psnapgst", offset, size)
