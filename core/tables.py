"""Portal tables: sorted by the column a user clicks (``?ordering=name`` or ``-name``),
paginated, with links that keep the table's filters.

A table names the columns it sorts by (a whitelist); any other ``ordering`` keeps the
table's default order and says so in a message, never a 500. Every order ends with the
primary key, so that rows with equal values never move from one page to another.
"""
from __future__ import annotations

from dataclasses import dataclass

from django.contrib import messages
from django.core.paginator import Page, Paginator
from django.db.models import Case, F, IntegerField, QuerySet, Value, When
from django.http import HttpRequest


def ranked(field: str, values) -> Case:
    """``field`` sorted in the order of ``values`` (least first: healthy, warning, critical),
    not alphabetically."""
    return Case(*[When(**{field: v}, then=Value(n)) for n, v in enumerate(values)], default=Value(len(values)),
                output_field=IntegerField())


@dataclass(frozen=True)
class Sorting:
    """The columns a table sorts by: ``?ordering=`` name -> the fields (or expressions) it
    orders by."""

    columns: dict[str, tuple]
    default: str  # a column name, "-" first for newest / largest first

    def order_by(self, ordering: str, model=None) -> list:
        descending = ordering.startswith("-")
        out = []
        for f in self.columns[ordering.removeprefix("-")]:
            expr = F(f) if isinstance(f, str) else f
            # Rows without a value (an item with no RPO yet) come last either way. Only where
            # a column may be empty: NULLS LAST on a descending NOT NULL column keeps
            # PostgreSQL from reading its index backwards (a sort of every row instead).
            if isinstance(f, str) and model is not None and not _nullable(model, f):
                out.append(expr.desc() if descending else expr.asc())
            else:
                out.append(expr.desc(nulls_last=True) if descending else expr.asc(nulls_last=True))
        return [*out, "-pk" if descending else "pk"]


def _nullable(model, path: str) -> bool:
    """Whether the column a lookup path (``policy__name``) reaches may be NULL in a row."""
    for part in path.split("__"):
        field = model._meta.get_field(part)
        if field.null:
            return True
        model = field.related_model
    return False


def table_ordering(request: HttpRequest, sorting: Sorting) -> str:
    """The ordering the request asks for, if the table sorts by it; the default otherwise,
    with a message naming the columns it does sort by."""
    wanted = request.GET.get("ordering", "").strip()
    if not wanted:
        return sorting.default
    if wanted.removeprefix("-") in sorting.columns:
        return wanted
    if getattr(request, "htmx", False):  # a refresh of the rows: the page itself already said it
        return sorting.default
    messages.warning(request, f"This table cannot be sorted by {wanted[:40]!r}: it sorts by "
                              f"{', '.join(sorting.columns)} (add '-' first for descending). "
                              f"It is sorted by {sorting.default} instead.")
    return sorting.default


def table_page(request: HttpRequest, rows: QuerySet, *, sorting: Sorting, per_page: int) -> tuple[Page, str]:
    """(the page of sorted rows the request asks for, the ordering used). A page number out
    of range or not a number shows the last or the first page."""
    ordering = table_ordering(request, sorting)
    page = Paginator(rows.order_by(*sorting.order_by(ordering, rows.model)), per_page).get_page(request.GET.get("page"))
    return page, ordering
