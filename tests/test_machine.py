"""The process-wide allocator setting made at import (`machine.keep_freed_memory`)."""
import os
import subprocess
import sys

import pytest

# Allocates and frees a 64 MB buffer (above glibc's largest dynamic mmap threshold) 20 times,
# after a warm-up, and prints the minor page faults those allocations caused. (`import nd_utils`
# loads nothing heavy, so the heap starts small: its first few growths fault in whatever the
# setting; the warm-up leaves the steady state that every later batch of a stage sees.)
FAULTS = """
import resource, nd_utils, torch
for _ in range(8):
    torch.empty(16 * 2**20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 * 2**20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
      nd_utils.machine.keep_freed_memory())
"""


def _faults(tuning: str) -> tuple[int, bool]:
    env = {**os.environ, "ND_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[0]), out[1] == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    tuned, on = _faults("1")
    default, off = _faults("0")
    assert on and not off
    # glibc's default unmaps each 64 MB block on free: 20 x 16384 pages fault in again
    assert default > 20 * 16384 * 0.9
    assert tuned < default / 5, (tuned, default)  # measured: 0 against 327,700
