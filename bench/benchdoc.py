"""The benchmarks page (docs/BENCHMARKS.md) is written by several benchmarks: each replaces
only its own section, so one benchmark run alone never drops another's figures."""
from __future__ import annotations

import os

SECTIONS = ("## Recovery time (RTO)", "## Resynchronization against rsync", "## Recovery plan RTO", "## Failback",
            "## RPO under load", "## Control plane at scale")


def replace_section(path: str, title: str, lines: list[str]) -> None:
    """Put ``lines`` (starting with ``title``) in place of the section ``title`` of the page,
    or at its end."""
    text = open(path).read() if os.path.exists(path) else ""
    at = text.find(title)
    if at < 0:
        head, tail = text, ""
    else:
        head = text[:at]
        later = [text.find(s, at + len(title)) for s in SECTIONS if s != title]
        later = [i for i in later if i >= 0]
        tail = text[min(later):] if later else ""
    body = head.rstrip("\n") + "\n\n" + "\n".join(lines).rstrip("\n") + "\n"
    if tail:
        body += "\n" + tail
    with open(path, "w") as fh:
        fh.write(body)


def sections_after_head(text: str) -> str:
    """What follows the replication benchmark's own part of the page (the other sections)."""
    found = [i for i in (text.find(s) for s in SECTIONS) if i >= 0]
    return text[min(found):] if found else ""
