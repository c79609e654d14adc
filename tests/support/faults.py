"""Faults a test can really cause: a small filesystem that fills up, and a low open-files limit."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of `size` at `path`; yields False (nothing mounted) when that is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield False
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def open_files_limit(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a running process."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise RuntimeError(f"no open-files limit in /proc/{pid}/limits")


def set_open_files_limit(pid: int, soft: int) -> bool:
    """Set a running process's soft RLIMIT_NOFILE with prlimit (hard unchanged); False when not permitted."""
    if shutil.which("prlimit") is None:
        return False
    _soft, hard = open_files_limit(pid)
    done = subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={min(soft, hard)}:{hard}"], capture_output=True)
    return done.returncode == 0


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
