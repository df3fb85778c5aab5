"""Checksums of the image.

Metadata records (small) carry CRC32 from zlib. Page data and ghost file
contents carry XXH3-64: the dump hashes every stored byte and the reader
verifies every byte before a restore, and zlib's CRC32 (about 2 GiB/s
here) would cost more than copying the memory; XXH3 runs at 11-20 GiB/s.
"""

from __future__ import annotations

import xxhash


def data_hash(data) -> int:
    """XXH3-64 of a buffer (bytes, memoryview, mmap slice)."""
    return xxhash.xxh3_64_intdigest(data)


def data_hash_in_steps(data, step: int, done) -> int:
    """data_hash of a big buffer, `step` bytes at a time; done(nbytes) after each."""
    state = xxhash.xxh3_64()
    for offset in range(0, len(data), step):
        piece = data[offset : offset + step]
        state.update(piece)
        done(len(piece))
    return state.intdigest()
