"""Where a run came from: the library's version and git commit, torch and CUDA, the device, the
threads and the command line, recorded in ``summary.json`` (``provenance``) so that a number can
be traced to the code and the machine that made it. Two CPUs with other vector instruction sets
round torch's kernels differently, and a run of thousands of steps drifts from there: the CPU's
model name is part of the record."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["cpu_name", "git_state", "machine_line", "provenance"]

PACKAGE = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """The commit of the working copy the package is imported from, and whether it has
    uncommitted changes (``{}`` outside a git working copy, or without git)."""
    try:
        top = subprocess.run(
            ["git", "-C", str(PACKAGE), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if top.returncode:
            return {}
        root, commit = top.stdout.split()
        status = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}
    return {"commit": commit, "dirty": bool(status.stdout.strip())}


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bilevel")
    except PackageNotFoundError:
        return "unknown"


def _cpu_capability() -> str | None:
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    try:
        return str(get()) if callable(get) else None
    except RuntimeError:
        return None


def machine_line() -> str:
    """Where a table was made, in one phrase for its first line: the CPU and its vector
    kernels, the torch threads and cores, the GPU if any, the torch version."""
    threads = torch.get_num_threads()
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu_name()} ({_cpu_capability() or 'default'} kernels), {threads} "
        f"thread{'s' if threads != 1 else ''} of {os.cpu_count()} cores, {gpu}, "
        f"torch {torch.__version__}"
    )


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    """What made this run: versions, commit, device, threads, command line."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    record: dict[str, Any] = {
        "bilevel": _version(),
        **{f"git_{k}": v for k, v in git_state().items()},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda" and torch.cuda.is_available()
            else cpu_name()
        ),
        "cpu": cpu_name(),
        # the vector instructions torch's CPU kernels use (AVX512, AVX2, ...): what rounds alike
        "cpu_capability": _cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "cwd": os.getcwd(),
    }
    return record
