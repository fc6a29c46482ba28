"""keep_freed_memory: large CPU tensors reuse the process's pages (no page faults), and it stays out of the way
where it should."""

import json
import os
import platform
import subprocess
import sys

import pytest

from stylealigned import cpu_memory
from stylealigned.cpu_memory import M_MMAP_MAX, M_TRIM_THRESHOLD, OPT_OUT, keep_freed_memory

# A fresh process: keep freed memory (or not), then make a 64 MiB tensor eight times; the minor faults of each.
FAULTS = """
import json, resource, torch
from stylealigned import keep_freed_memory
kept, faults = keep_freed_memory(), []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps([kept, faults]))
"""
PAGES = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")


def faults_per_tensor(**env) -> tuple[bool, list[int]]:
    out = subprocess.run([sys.executable, "-c", FAULTS], env=os.environ | env, capture_output=True, text=True,
                         check=True).stdout
    return tuple(json.loads(out.splitlines()[-1]))


# Decided apart from cpu_memory's own detection, so that a broken detection fails here instead of skipping.
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only: elsewhere nothing is kept, "
                    "which test_another_c_library_is_left_alone covers")
def test_a_kept_heap_gives_the_next_large_tensors_the_same_pages():
    kept, faults = faults_per_tensor(**{OPT_OUT: "1"})
    # the heap may place the first few at two addresses (small objects between them), then reuses their pages
    assert kept and sum(faults[4:]) < PAGES / 2, faults
    returned, faults = faults_per_tensor(**{OPT_OUT: "0"})
    assert not returned and min(faults) > PAGES / 2, faults  # glibc as it comes: every page faults in again


@pytest.fixture
def calls(monkeypatch):
    """mallopt's calls, recorded instead of made, in a process where nothing was kept yet."""
    made = []
    monkeypatch.setattr(cpu_memory, "_kept", False)
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda: lambda parameter, value: made.append((parameter, value)) or 1)
    for name in (OPT_OUT, *cpu_memory.GLIBC_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    return made


def test_keeping_turns_off_mmapped_allocations_and_trimming(calls):
    assert keep_freed_memory() and cpu_memory.freed_memory_kept()
    assert calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)]


@pytest.mark.parametrize("name, value", [(OPT_OUT, "0"), ("MALLOC_TRIM_THRESHOLD_", "131072"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=8")])
def test_an_opt_out_or_the_users_own_glibc_settings_are_left_alone(calls, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert not keep_freed_memory() and calls == []


def test_another_c_library_is_left_alone(calls, monkeypatch):
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda: None)
    assert not keep_freed_memory() and not cpu_memory.freed_memory_kept()


def test_the_cli_keeps_freed_memory(monkeypatch):
    from stylealigned import cli

    called = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: called.append(True))
    monkeypatch.setattr(sys, "argv", ["stylealigned", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert called == [True]
