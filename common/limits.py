"""Every size and count a user gives has a bound: what this machine can hold.

A command estimates, before it builds anything, the memory a size or count needs and refuses one
that cannot fit, naming the estimate and the limit, instead of being killed by the kernel halfway
(and leaving a half-built folder). The estimates are lower bounds (the largest tensors alone),
so a refusal is certain; a size under the bound may still be slow.
"""

from __future__ import annotations

import os

from common.errors import UserError
from common.files import human_bytes


def available_memory() -> int:
    """Bytes this process can still allocate: the kernel's MemAvailable (all of RAM where it
    is not reported)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(what: str, estimate: float, hint: str = "") -> None:
    """Refuse (``UserError``) ``what`` when its ``estimate`` in bytes exceeds the memory
    available now."""
    limit = available_memory()
    if estimate > limit:
        raise UserError(f"{what} needs at least {human_bytes(estimate)} of memory, more than "
                        f"the {human_bytes(limit)} this machine has available"
                        + (f"; {hint}" if hint else ""))
