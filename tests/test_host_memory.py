"""Heap retention on CPU (orpo_core/models/host_memory.py), measured in real child processes.

Each case runs a fresh Python that frees and re-creates a 64 MiB tensor 8 times (after 8 times
to settle) and reports its minor page faults (``getrusage``) and RSS: without retention glibc maps every such block anew
(16k faults each time), inside :func:`retained_heap` the freed block is reused (almost no faults),
and leaving the block gives the memory back to the kernel.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc mallopt only"
)

CHILD = r"""
import json, resource, sys, torch
from orpo_core.models.host_memory import retained_heap

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def cycle(n):
    for _ in range(n):
        t = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MiB
        t.fill_(1.0)
        del t

def churn():
    cycle(8)  # warm-up: the heap settles (glibc may place the first blocks apart)
    f0 = faults()
    cycle(8)
    return faults() - f0

base = rss_mib()
if sys.argv[1] == "retained":
    with retained_heap() as on:
        n = churn()
        inside = rss_mib()
    after = rss_mib()
else:
    on, n, inside = False, churn(), rss_mib()
    after = inside
print(json.dumps({"on": on, "faults": n, "base": base, "inside": inside, "after": after}))
"""


def _child(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_heap_stops_the_page_faults_and_gives_memory_back():
    plain = _child("plain")
    kept = _child("retained")
    assert plain["on"] is False and kept["on"] is True
    assert plain["faults"] >= 8 * 16_000  # each 64 MiB block faulted in again (4 KiB pages)
    assert kept["faults"] <= 2 * 16_384  # at most two of the eight blocks faulted: freed blocks were reused
    assert kept["inside"] - kept["base"] >= 60  # the 64 MiB block stayed in the process ...
    assert kept["after"] - kept["base"] < 16  # ... until the block ended (malloc_trim)


def test_env_switch_turns_it_off():
    off = _child("retained", ORPO_RETAIN_HEAP="0")
    assert off["on"] is False and off["faults"] >= 8 * 16_000
