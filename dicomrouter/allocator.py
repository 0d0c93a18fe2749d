"""Keep the memory of large buffers in the process instead of giving it back to the kernel at once.

glibc serves every allocation over its mmap threshold (128 KiB at first) with fresh pages from the
kernel and unmaps them when freed; memory freed at the top of the heap goes back past its trim
threshold. A router receiving half-megabyte instances allocates several such buffers per instance
(each PDU read, the data set joined, values copied by the parser, blocks read for forwarding), so
every one of them cost page faults and zeroing: measured on a 2-core VM, 1.3 ms of CPU per instance
for the buffers of one 525 KB instance, against 0.1 ms when their memory is reused.

So `serve` raises both thresholds: buffers up to `MMAP_THRESHOLD` come from the heap and are reused,
and the heap keeps up to `TRIM_THRESHOLD` of free memory. The process's resident size then follows its
peak of instances in flight (bounded by `max_associations` and `router.max_in_memory_dataset`) and
stays flat; it does not grow with the number of instances.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest on 64-bit systems
TRIM_THRESHOLD = 128 * 1024 * 1024


def keep_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator does as it does
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
