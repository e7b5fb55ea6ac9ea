from django import template
from django.template.defaultfilters import filesizeformat
from django.utils.html import format_html
from django.utils.safestring import mark_safe

register = template.Library()


@register.filter
def duration(seconds) -> str:
    """A number of seconds as '45 s', '12 min', '3 h 5 min', '2 d 4 h'."""
    if seconds is None or seconds == "":
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec} s" if minutes < 10 and sec else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


@register.filter
def size(value) -> str:
    return "—" if value is None else filesizeformat(value)


@register.filter
def lower_label(value) -> str:
    return str(value).lower()


# --- portal tables (core/tables.py) ---------------------------------------------------------


@register.simple_tag(takes_context=True)
def query_with(context, **changes) -> str:
    """The current query string with ``changes`` applied (a value of None drops the key):
    page links and sort links keep the table's filters."""
    params = context["request"].GET.copy()
    for key, value in changes.items():
        params.pop(key, None)
        if value is not None and value != "":
            params[key] = value
    return "?" + params.urlencode() if params else "?"


@register.simple_tag(takes_context=True)
def sort_th(context, label: str, column: str) -> str:
    """A column header that sorts the table by ``column`` (``ordering`` in the context is
    the current one): ascending first, a second click descending; back to the first page."""
    current = context.get("ordering", "")
    ascending = current == column
    descending = current == f"-{column}"
    target = f"-{column}" if ascending else column
    arrow = " ▲" if ascending else " ▼" if descending else ""
    sort = ' aria-sort="ascending"' if ascending else ' aria-sort="descending"' if descending else ""
    href = query_with(context, ordering=target, page=None)
    return format_html('<th{}><a class="sort" href="{}">{}{}</a></th>', mark_safe(sort), href, label, arrow)
