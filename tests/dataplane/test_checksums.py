"""The checksums replication data carries: a faster CRC-32 that is still zlib's (the wire
format and stored journals do not change), and the block map's BLAKE3 digest."""
from __future__ import annotations

import random
import zlib

from mobility.checksums import DIGEST_BYTES, block_digest, crc32


def test_crc32_gives_zlibs_values_for_every_shape_of_input():
    rng = random.Random(11)
    for size in (0, 1, 3, 15, 16, 17, 63, 64, 65, 511, 4096, 65537, 1 << 20):
        data = rng.randbytes(size)
        start = rng.getrandbits(32)
        assert crc32(data) == zlib.crc32(data), size
        assert crc32(data, start) == zlib.crc32(data, start), size
        assert crc32(memoryview(data)[1:]) == zlib.crc32(data[1:]), size
        assert crc32(bytearray(data)) == zlib.crc32(data), size
    # chained over pieces, as the process server checks a body piece by piece
    data = rng.randbytes(300_001)
    crc = 0
    for i in range(0, len(data), 65_536):
        crc = crc32(memoryview(data)[i : i + 65_536], crc)
    assert crc == zlib.crc32(data)


def test_block_digest_is_blake3():
    # the published BLAKE3 digests of the empty input and of b"abc"
    assert block_digest(b"").hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert block_digest(b"abc").hex() == "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    block = random.Random(5).randbytes(256 * 1024)
    assert len(block_digest(block)) == DIGEST_BYTES
    assert block_digest(memoryview(block)) == block_digest(block)
    changed = bytearray(block)
    changed[123_456] ^= 1
    assert block_digest(changed) != block_digest(block)
