"""Small wording helpers shared by the apps' job messages."""
from __future__ import annotations


def size_text(n: int | float) -> str:
    """A byte count for people: "512 bytes", "3.0 KiB", "12.0 MiB", "2.0 GiB"."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
