"""A child process never outlives the process that started it (Linux; elsewhere a no-op).

A flow run or ``dvc repro`` killed with SIGKILL cannot stop its children, and an orphaned
stage would go on writing outputs while the next run starts on the same workspace. The
kernel's parent-death signal (``PR_SET_PDEATHSIG``) closes that gap: the flow starts
``dvc`` through ``python -m pipeline.system.process -- dvc ...`` and every stage sets it for
itself, so killing the flow takes dvc down, and dvc's death takes the stage down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies.

    Returns False where that is not available (not Linux). The signal is tied to the
    parent *thread*, which here is always the one waiting for the child to finish.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
    return True


def seconds_since_start() -> float | None:
    """How long this process has existed (from /proc on Linux; None elsewhere): a stage's
    start-up, when asked as it starts its work."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime", encoding="ascii") as fh:  # the same clock, since boot
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return round(uptime - ticks / os.sysconf("SC_CLK_TCK"), 2)


def main(argv: list[str]) -> None:
    """``python -m pipeline.system.process -- CMD ARGS...``: exec CMD, killed when our parent dies
    (the setting survives ``exec``)."""
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        raise SystemExit("usage: python -m pipeline.system.process -- CMD [ARGS...]")
    exit_with_parent(signal.SIGKILL)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
