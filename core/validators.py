"""Validators shared by the models, forms and serializers."""
from __future__ import annotations

import unicodedata

from django.core.exceptions import ValidationError


def single_line(value: str) -> None:
    """Names are one line of printable text: a CR/LF in a vault name would end up in the
    headers of its alert e-mails (and stop them), and control characters in logs and pages."""
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in str(value)):
        raise ValidationError("Names cannot contain line breaks or control characters.", code="control_characters")
