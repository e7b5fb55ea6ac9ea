"""Filters for ids: ASCII digits only, within PostgreSQL's bigint, or a 400 with a sentence."""
from __future__ import annotations

import datetime
import re

import django_filters
from django import forms
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field

BIGINT_MAX = 2**63 - 1
_ASCII_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)


def parse_id(value) -> int | None:
    """``value`` as a database id (1 to 2^63 - 1, ASCII digits only), or None."""
    text = str(value).strip() if value is not None else ""
    if not _ASCII_DIGITS.fullmatch(text):
        return None
    number = int(text)
    return number if 1 <= number <= BIGINT_MAX else None


class IdField(forms.Field):
    default_error_messages = {"invalid": f"Enter an id: a whole number from 1 to {BIGINT_MAX}."}

    def to_python(self, value):
        if value in self.empty_values:
            return None
        number = parse_id(value)
        if number is None:
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        return number


@extend_schema_field(OpenApiTypes.INT64)
class IdFilter(django_filters.Filter):
    """``?vault=<id>``: a positive bigint; anything else is refused, not silently matched."""

    field_class = IdField


class InstantField(django_filters.fields.IsoDateTimeField):
    """An ISO 8601 date and time, turned into UTC: PostgreSQL refuses offsets beyond ±15:59
    that Python accepts (up to ±23:59), so ``-19:23`` would otherwise be a server error."""

    default_error_messages = {"invalid": "Enter a date and time in ISO 8601, e.g. 2026-12-06T18:00:00Z."}

    def to_python(self, value):
        moment = super().to_python(value)
        if moment is None or moment.tzinfo is None:
            return moment
        try:
            return moment.astimezone(datetime.timezone.utc)
        except OverflowError:
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid") from None


class InstantFilter(django_filters.IsoDateTimeFilter):
    """``?after=<ISO 8601>``: any offset Python reads, compared in UTC."""

    field_class = InstantField
