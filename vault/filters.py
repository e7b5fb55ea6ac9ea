"""Filtersets shared by the API lists and the portal tables."""
import django_filters

from core.filters import IdFilter
from vault.models import Alert, DiscoveredMachine, Event, ProcessServer, ReplicationPolicy, VCenter


class VaultScopedFilter(django_filters.FilterSet):
    vault = IdFilter(field_name="vault_id")


class PolicyFilter(VaultScopedFilter):
    name = django_filters.CharFilter(lookup_expr="icontains")

    class Meta:
        model = ReplicationPolicy
        fields = ["vault", "name", "storage_tier", "is_failback"]


class VCenterFilter(VaultScopedFilter):
    class Meta:
        model = VCenter
        fields = ["vault", "kind"]


class ProcessServerFilter(VaultScopedFilter):
    class Meta:
        model = ProcessServer
        fields = ["vault", "site", "health"]


class MachineFilter(VaultScopedFilter):
    name = django_filters.CharFilter(lookup_expr="icontains")
    vcenter = IdFilter(field_name="vcenter_id")
    protected = django_filters.BooleanFilter(method="filter_protected")

    class Meta:
        model = DiscoveredMachine
        fields = ["vault", "vcenter", "source", "missing", "power_state", "name"]

    def filter_protected(self, queryset, name, value):
        return queryset.filter(protected_items__isnull=not value)


class EventFilter(VaultScopedFilter):
    item = django_filters.UUIDFilter(field_name="protected_item_id")
    message = django_filters.CharFilter(lookup_expr="icontains")

    class Meta:
        model = Event
        fields = ["vault", "severity", "kind", "item"]


class AlertFilter(VaultScopedFilter):
    item = django_filters.UUIDFilter(field_name="protected_item_id")

    class Meta:
        model = Alert
        fields = ["vault", "severity", "kind", "state", "acknowledged", "item"]
