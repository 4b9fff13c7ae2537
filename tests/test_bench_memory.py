"""The data benchmark's memory figure: a build's process tree sampled until it exits. Ray's processes map the
object store and the same libraries, so a sum of RSS counts each shared page once per process that touched it;
the benchmark's figure (PSS, each shared page split among its sharers) counts it once."""

from __future__ import annotations

import subprocess
import sys

from recfound.bench.data import MIB, peak_memory

SHARED_MIB = 96
TREE = f"""
import mmap, os, time
shared = mmap.mmap(-1, {SHARED_MIB} << 20)  # anonymous MAP_SHARED: the parent's and the child's pages are one
def touch():
    for offset in range(0, len(shared), 4096):
        shared[offset] = 1
touch()
if os.fork() == 0:
    touch()
    time.sleep(1.5)
    os._exit(0)
time.sleep(1.5)
os.wait()
"""


def test_shared_pages_count_once_in_the_peak_and_twice_in_the_summed_rss() -> None:
    process = subprocess.Popen([sys.executable, "-c", TREE])
    peak = peak_memory(process)
    assert process.returncode == 0
    # the sum of RSS counts the shared region in both processes; PSS splits it between them
    assert peak.rss > 2 * SHARED_MIB * MIB
    assert SHARED_MIB * MIB < peak.pss < peak.rss - 0.8 * SHARED_MIB * MIB
