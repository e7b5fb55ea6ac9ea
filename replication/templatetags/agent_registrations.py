"""``{% pending_agent_registrations vault %}``: the agent registrations of a vault that wait
for an administrator, for the infrastructure page (the vault app's page shows them without
importing the replication app)."""
from django import template

from replication.choices import RegistrationState
from replication.models import AgentRegistration

register = template.Library()


@register.inclusion_tag("replication/agent_registrations.html", takes_context=True)
def pending_agent_registrations(context, vault):
    registrations = (AgentRegistration.objects.filter(vault=vault, state=RegistrationState.PENDING)
                     .select_related("machine", "machine__agent").order_by("created_at")[:100])
    return {"registrations": registrations, "can": context.get("can"), "csrf_token": context.get("csrf_token")}
