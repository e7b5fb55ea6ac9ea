"""The failback card of an item's page: ``{% load failback %}{% failback_card item user %}``.

The item page belongs to replication, which imports no later app; the card comes in through
this tag library instead."""
from django import template

from failback import services
from failback.models import FailbackLocation
from replication.choices import Direction

register = template.Library()


@register.inclusion_tag("failback/card.html", takes_context=True)
def failback_card(context, item, user):
    failback = services.current_failback(item=item)
    last = None
    if failback is None and item.direction == Direction.PRIMARY_TO_RECOVERY:
        last = item.failbacks.order_by("-created_at").first()
    return {
        "item": item, "user": user, "failback": failback, "last": last, "can": context.get("can"),
        "returning": item.direction == Direction.RECOVERY_TO_PRIMARY,
        "operations": services.failback_operations(item=item) if failback is not None or item.protection_state == "FAILOVER_COMMITTED" else [],
        "original": FailbackLocation.ORIGINAL,
    }
