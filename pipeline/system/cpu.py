"""What this CPU is, and which int8 kernels onnxruntime picks on it.

onnxruntime's MLAS chooses its x86-64 integer kernels from CPUID at start-up
(``onnxruntime/core/mlas/lib/platform.cpp``): AMX, AVX512-VNNI or AVX-VNNI add u8×s8
products in exact int32; AVX-512 without VNNI and AVX2 use ``vpmaddubsw``, which sums
each pair of u8×s8 products in a saturating int16, so a weight range of 8 bits can clip
there and only there; SSE widens to int16 first and is exact. That choice is made per
machine, so ``onnx_check`` records it beside the figures it measured.

The features are read with the CPUID instruction itself (a few bytes of machine code run
through ctypes), not from ``/proc/cpuinfo``: under an emulator (``qemu-x86_64 -cpu
Haswell``) only CPUID tells what the emulated CPU has, and the kernels follow CPUID.
Elsewhere (another architecture, or a system that refuses executable memory) the
answer says the features are unknown instead of guessing.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from dataclasses import dataclass
from functools import cache

# void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4]) -- System V AMD64 calling convention
_CPUID = bytes.fromhex(
    "53"  # push rbx (callee-saved; cpuid writes it)
    "89f8"  # mov eax, edi (leaf)
    "89f1"  # mov ecx, esi (subleaf)
    "4989d0"  # mov r8, rdx (out)
    "0fa2"  # cpuid
    "418900"  # mov [r8], eax
    "41895804"  # mov [r8+4], ebx
    "41894808"  # mov [r8+8], ecx
    "4189500c"  # mov [r8+12], edx
    "5b"  # pop rbx
    "c3"  # ret
)
# uint64 xgetbv(uint32 index): which register states the operating system saves
_XGETBV = bytes.fromhex(
    "89f9"  # mov ecx, edi
    "0f01d0"  # xgetbv
    "48c1e220"  # shl rdx, 32
    "4809d0"  # or rax, rdx
    "c3"  # ret
)

# (name, leaf, subleaf, register index 0..3 = eax ebx ecx edx, bit)
_FEATURES = (
    ("sse4_1", 1, 0, 2, 19),
    ("avx", 1, 0, 2, 28),
    ("fma", 1, 0, 2, 12),
    ("avx2", 7, 0, 1, 5),
    ("avx512f", 7, 0, 1, 16),
    ("avx512dq", 7, 0, 1, 17),
    ("avx512bw", 7, 0, 1, 30),
    ("avx512vl", 7, 0, 1, 31),
    ("avx512_vnni", 7, 0, 2, 11),
    ("avx512_bf16", 7, 1, 0, 5),
    ("avx_vnni", 7, 1, 0, 4),
    ("amx_tile", 7, 0, 3, 24),
    ("amx_int8", 7, 0, 3, 25),
    ("amx_bf16", 7, 0, 3, 22),
)
_OSXSAVE = (1, 0, 2, 27)


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's name, its SIMD features the OS lets programs use, and the int8 path."""

    model: str
    machine: str
    features: tuple[str, ...] | None  # None: could not be read here
    int8_kernel: str
    int8_exact: bool | None  # False: u8×s8 pairs saturate in int16 unless weights fit 7 bits

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "machine": self.machine,
            "features": list(self.features) if self.features is not None else None,
            "onnxruntime_int8_kernel": self.int8_kernel,
            "int8_u8s8_exact": self.int8_exact,
        }


def _function(code: bytes, restype, *argtypes):
    """A callable over ``code`` in its own executable page (kept alive with the function)."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function = ctypes.CFUNCTYPE(restype, *argtypes)(address)
    function.page = page  # the page must outlive every call
    return function


def _read_cpuid() -> tuple[dict[tuple[int, int], tuple[int, int, int, int]], int] | None:
    try:
        cpuid = _function(
            _CPUID, None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)
        )
    except (OSError, ValueError, PermissionError, AttributeError):
        return None  # no executable anonymous memory here (hardened kernel, not POSIX)
    out = (ctypes.c_uint32 * 4)()
    leaves = {}
    for leaf, subleaf in ((0, 0), (1, 0), (7, 0), (7, 1), (0x80000000, 0)):
        cpuid(leaf, subleaf, out)
        leaves[(leaf, subleaf)] = tuple(out)
    if leaves[(0x80000000, 0)][0] >= 0x80000004:
        brand = b""
        for leaf in (0x80000002, 0x80000003, 0x80000004):
            cpuid(leaf, 0, out)
            brand += bytes(out)
        leaves[("brand", 0)] = brand.rstrip(b"\0").decode("ascii", "replace").strip()
    max_leaf = leaves[(0, 0)][0]
    if max_leaf < 7:
        leaves[(7, 0)] = leaves[(7, 1)] = (0, 0, 0, 0)
    xcr0 = 0
    osxsave = leaves[(_OSXSAVE[0], _OSXSAVE[1])][_OSXSAVE[2]] >> _OSXSAVE[3] & 1
    if osxsave:
        xcr0 = _function(_XGETBV, ctypes.c_uint64, ctypes.c_uint32)(0)
    return leaves, xcr0


def _usable(leaves, xcr0: int) -> tuple[str, ...]:
    """Features CPUID reports, less those whose registers the OS does not save (XCR0)."""
    present = {
        name for name, leaf, sub, reg, bit in _FEATURES if leaves[(leaf, sub)][reg] >> bit & 1
    }
    ymm, zmm, tiles = (xcr0 & 0x6) == 0x6, (xcr0 & 0xE6) == 0xE6, (xcr0 & 0x60000) == 0x60000
    usable = {
        name
        for name in present
        if (name.startswith("avx512") and zmm)
        or (name.startswith("amx") and tiles)
        or (name.startswith("avx") and not name.startswith("avx512") and ymm)
        or not name.startswith(("avx", "amx"))
    }
    return tuple(name for name, *_ in _FEATURES if name in usable)


def int8_kernel(features: tuple[str, ...]) -> tuple[str, bool]:
    """MLAS's u8×s8 kernel for these features (platform.cpp's order) and whether it is exact.

    AMX is listed as the CPU offers it; MLAS also needs the kernel's permission to use
    the tiles, which it asks for itself.
    """
    has = set(features)
    if not {"avx", "avx2", "fma"} <= has:
        return "sse (widened to int16, exact)", True
    if {"amx_tile", "amx_int8"} <= has:
        return "amx-int8 (int32 accumulation, exact)", True
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= has:
        if "avx512_vnni" in has:
            return "avx512-vnni (vpdpbusd, exact)", True
        return "avx512-core (vpmaddubsw: int16 pair sums saturate)", False
    if "avx_vnni" in has:
        return "avx-vnni (vpdpbusd, exact)", True
    return "avx2 (vpmaddubsw: int16 pair sums saturate)", False


def _proc_cpuinfo_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


@cache
def cpu_info() -> CpuInfo:
    """This CPU, read once per process."""
    machine = platform.machine().lower()
    read = _read_cpuid() if machine in ("x86_64", "amd64") else None
    if read is None:
        model = _proc_cpuinfo_model() or platform.processor() or machine
        return CpuInfo(model, machine, None, f"unknown ({machine})", None)
    leaves, xcr0 = read
    features = _usable(leaves, xcr0)
    kernel, exact = int8_kernel(features)
    model = leaves.get(("brand", 0)) or _proc_cpuinfo_model() or machine
    return CpuInfo(model, machine, features, kernel, exact)


if __name__ == "__main__":  # python -m pipeline.system.cpu: what this machine (or emulator) is
    import json
    import sys

    sys.stdout.write(json.dumps(cpu_info().to_dict(), indent=2) + "\n")
