import django_filters

from core.filters import IdFilter, InstantFilter
from replication.models import AgentRegistration, MobilityAgent, ProtectedItem, RecoveryPoint


class ProtectedItemFilter(django_filters.FilterSet):
    vault = IdFilter(field_name="vault_id")
    name = django_filters.CharFilter(lookup_expr="icontains")
    policy = IdFilter(field_name="policy_id")
    process_server = IdFilter(field_name="process_server_id")

    class Meta:
        model = ProtectedItem
        fields = ["vault", "name", "protection_state", "test_failover_state", "health", "policy", "process_server"]


class RecoveryPointFilter(django_filters.FilterSet):
    item = django_filters.UUIDFilter(field_name="item_id")
    after = InstantFilter(field_name="time", lookup_expr="gte")
    before = InstantFilter(field_name="time", lookup_expr="lte")

    class Meta:
        model = RecoveryPoint
        fields = ["item", "type", "after", "before"]


class MobilityAgentFilter(django_filters.FilterSet):
    vault = IdFilter(field_name="vault_id")
    machine = IdFilter(field_name="machine_id")

    class Meta:
        model = MobilityAgent
        fields = ["vault", "machine", "pushed"]


class AgentRegistrationFilter(django_filters.FilterSet):
    vault = IdFilter(field_name="vault_id")
    machine = IdFilter(field_name="machine_id")

    class Meta:
        model = AgentRegistration
        fields = ["vault", "machine", "state"]
