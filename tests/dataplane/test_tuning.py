"""The data-moving processes keep batch-sized buffers in the heap (mobility.tuning)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

REPO = __file__.rsplit("/tests/", 1)[0]

PROBE = textwrap.dedent("""
    import resource, sys
    from mobility.tuning import tune_allocator
    if sys.argv[1] == "tuned":
        assert tune_allocator() and tune_allocator()  # a second call is harmless
    def batches():  # a few batch-sized buffers live at once, as batches in flight are
        held = [bytearray(8 << 20) for _ in range(6)]
        del held
    batches()  # warm up: the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        batches()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_batch_sized_buffers_reuse_memory_once_tuned():
    """Untuned, the freed buffers go back to the system and every round of batches faults
    fresh pages in (about 2,048 per 8 MiB); tuned, the heap keeps them for the next round."""
    untuned, tuned = faults("default"), faults("tuned")
    assert untuned > 10 * 6 * 1000
    assert tuned < 10 * 6 * 20
