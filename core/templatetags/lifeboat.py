from django import template
from django.template.defaultfilters import filesizeformat

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
