"""The failback actions on replicationProtectedItems, and the failbacks themselves.

The verbs are ASR's: ``reProtect`` replicates a committed failover back on-premises (and,
after a committed failback, re-enables replication to the recovery site);
``plannedFailover`` / ``unplannedFailover`` of an item whose failback replicates back fail it
over to on-premises; ``failoverCommit`` then commits the failback. The explicit
``failBack``, ``failbackCommit`` and ``reEnableReplication`` say the same without
depending on the state. Each answers 202 with the job; a step the state does not allow is
409 with the current state, a bad body 400 that changes nothing.
"""
from __future__ import annotations

from django.db.models import Prefetch
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action

from core.api import accepted_job
from core.api_views import JobSerializer
from core import access
from core.permissions import VaultRole, VaultScoped
from failback import services
from failback.models import Failback, FailbackLocation
from failback.transitions import FailbackState
from recovery_plans.api import serializers as rs
from recovery_plans.api.views import RecoveryPlanViewSet, RecoveryProtectedItemViewSet
from recovery_plans.models import PlanRecoveryPoint
from recovery_plans.run_models import PlanOperation
from recovery_plans.services import POINT_CHOICES, POINT_HELP
from replication.choices import Direction


class FailbackSerializer(serializers.ModelSerializer):
    item_name = serializers.CharField(source="item.name", read_only=True)
    vcenter_name = serializers.CharField(source="vcenter.name", read_only=True)
    process_server_name = serializers.CharField(source="process_server.name", read_only=True)
    master_target_name = serializers.CharField(source="master_target.name", read_only=True)
    recovered_vm_name = serializers.CharField(source="recovered_vm.name", read_only=True)
    returning_item_state = serializers.CharField(source="returning_item.protection_state", read_only=True, default=None,
                                                 allow_null=True)

    class Meta:
        model = Failback
        fields = [
            "id", "vault", "item", "item_name", "returning_item", "returning_item_state", "state", "location",
            "vcenter", "vcenter_name", "target_name", "target_host", "target_datastore", "target_network",
            "target_vm_uuid", "process_server", "process_server_name", "master_target", "master_target_name",
            "recovered_vm", "recovered_vm_name", "figures", "last_error", "created_at", "updated_at",
        ]
        read_only_fields = fields


class ReprotectSerializer(serializers.Serializer):
    location = serializers.ChoiceField(
        choices=FailbackLocation.choices, default=FailbackLocation.ORIGINAL,
        help_text="ORIGINAL: the original on-premises VM's disks (only what differs is sent). ALTERNATE: a new VM "
                  "(on another host, datastore or vCenter), copied in full.")
    processServer = serializers.CharField(required=False, allow_blank=True, max_length=120,
                                          help_text="Id or name of a process server in the recovery site (default: the first).")
    masterTarget = serializers.CharField(required=False, allow_blank=True, max_length=120,
                                         help_text="Id or name of an on-premises master target server (default: the first).")
    vcenter = serializers.CharField(required=False, allow_blank=True, max_length=120,
                                    help_text="Id or name of the on-premises vCenter (default: the original VM's).")
    targetName = serializers.CharField(required=False, allow_blank=True, max_length=80,
                                       help_text="Alternate location: the new VM's name (default: <item>-failback).")
    targetHost = serializers.CharField(required=False, allow_blank=True, max_length=255,
                                       help_text="Alternate location: the host (default: the vCenter's first).")
    targetDatastore = serializers.CharField(required=False, allow_blank=True, max_length=255,
                                            help_text="Alternate location: the datastore (default: the first).")
    targetNetwork = serializers.CharField(required=False, allow_blank=True, max_length=255,
                                          help_text="Alternate location: the network (default: the first).")


class FailBackSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=services.FAILBACK_TYPE_CHOICES, default="planned",
                                   help_text="planned: the recovered VM shuts down and its last writes come home (no loss); "
                                             "unplanned: the chosen point of the returning replica.")
    recoveryPoint = serializers.ChoiceField(choices=list(POINT_CHOICES), default="latest", help_text=POINT_HELP)
    recoveryPointId = serializers.CharField(required=False, allow_blank=True, max_length=64)
    shutDownRecoveredVm = serializers.BooleanField(default=True, help_text="Unplanned: power the recovered VM off first.")


class FailbackSummarySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    state = serializers.ChoiceField(choices=FailbackState.choices)
    location = serializers.ChoiceField(choices=FailbackLocation.choices)
    returning_item = serializers.UUIDField(source="returning_item_id", allow_null=True)
    item = serializers.UUIDField(source="item_id")


class FailbackItemSerializer(rs.ProtectedItemRecoverySerializer):
    """A protected item with its failback under way: for the item that failed over, its way
    home; for a returning item (direction RECOVERY_TO_PRIMARY), the failback it belongs to."""

    failback = serializers.SerializerMethodField()

    class Meta(rs.ProtectedItemRecoverySerializer.Meta):
        fields = [*rs.ProtectedItemRecoverySerializer.Meta.fields, "failback"]
        read_only_fields = fields

    @extend_schema_field(FailbackSummarySerializer(allow_null=True))
    def get_failback(self, obj):
        # From the viewset's prefetch: no query per item.
        if obj.direction == Direction.RECOVERY_TO_PRIMARY:
            failback = getattr(obj, "returning_for", None) if hasattr(obj, "returning_for") else None
        else:
            failback = next(iter(obj.failbacks.all()), None)
        return FailbackSummarySerializer(failback).data if failback is not None else None


class FailbackProtectedItemViewSet(RecoveryProtectedItemViewSet):
    """replicationProtectedItems: replicated VMs with their state, health and RPO, the VMs recovered
    from them, and their failback.

    POST enables replication (202 + the job), DELETE disables it (202 + the job), PATCH sets
    the recovery site and network mapping. Recovery operations (testFailover,
    testFailoverCleanup, plannedFailover, unplannedFailover, applyRecoveryPoint,
    failoverCommit) and failback (reProtect, failBack, failbackCommit, reEnableReplication;
    plannedFailover, unplannedFailover and failoverCommit of an item replicating back) answer
    202 with the job and a Location header; one the state does not allow (or a second one
    while one runs) is 409 with the current state.
    """

    serializer_class = FailbackItemSerializer
    # returning_for in a query of its own, not joined: see ProtectedItemViewSet.queryset.
    queryset = RecoveryProtectedItemViewSet.queryset.prefetch_related(
        "returning_for", Prefetch("failbacks", queryset=Failback.objects.filter(state__in=FailbackState.ACTIVE), to_attr=None))

    def _failing_back(self, item) -> bool:
        if item.direction == Direction.RECOVERY_TO_PRIMARY:
            return True
        failback = services.current_failback(item=item)
        return failback is not None and failback.state not in (FailbackState.REPROTECTING, FailbackState.REPROTECT_FAILED)

    def _failback(self, request, item, failover_type: str, data: dict):
        _, job = services.failback_failover(
            item=item, failover_type=failover_type, point=data.get("recoveryPoint", "latest"),
            recovery_point_id=data.get("recoveryPointId") or None,
            shut_down=data.get("shutDownRecoveredVm", data.get("shutDownSource", True)), user=request.user)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=ReprotectSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="reProtect")
    def re_protect(self, request, pk=None):
        """Reprotect: after a committed failover, replicate the recovered VM back on-premises (original
        or alternate location); after a committed failback, re-enable replication to the recovery site."""
        data = self._body(ReprotectSerializer)
        _, job = services.failback_next(
            item=self.get_object(), location=data["location"], process_server=data.get("processServer") or None,
            master_target=data.get("masterTarget") or None, vcenter=data.get("vcenter") or None,
            target_name=data.get("targetName", ""), target_host=data.get("targetHost", ""),
            target_datastore=data.get("targetDatastore", ""), target_network=data.get("targetNetwork", ""),
            user=request.user)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=FailBackSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="failBack")
    def fail_back(self, request, pk=None):
        """Fail over to on-premises (planned: zero loss; unplanned: a point of the returning replica)."""
        data = self._body(FailBackSerializer)
        return self._failback(request, self.get_object(), data["type"], data)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="failbackCommit")
    def failback_commit(self, request, pk=None):
        """Make the failback final."""
        _, job = services.failback_commit(item=self.get_object(), user=request.user)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="reEnableReplication")
    def re_enable(self, request, pk=None):
        """After a committed failback: replicate to the recovery site again, sending only what differs."""
        _, job = services.failback_reenable(item=self.get_object(), user=request.user)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=rs.PlannedFailoverSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="plannedFailover")
    def planned_failover(self, request, pk=None):
        """Planned failover: shut the source down, replicate its last writes, recover with no data lost.
        For an item replicating back (failback) this fails it over to on-premises."""
        item = self.get_object()
        if self._failing_back(item):
            return self._failback(request, item, "planned", {})
        return super().planned_failover(request, pk)

    @extend_schema(request=rs.UnplannedFailoverSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="unplannedFailover")
    def unplanned_failover(self, request, pk=None):
        """Unplanned failover to the chosen point (the source is shut down first if asked and reachable).
        For an item replicating back (failback) this fails it over to on-premises."""
        item = self.get_object()
        if self._failing_back(item):
            return self._failback(request, item, "unplanned", self._body(rs.UnplannedFailoverSerializer))
        return super().unplanned_failover(request, pk)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="failoverCommit")
    def failover_commit(self, request, pk=None):
        """Make the failover final and release the recovery points no longer needed; for an item that
        failed back to on-premises, commit the failback."""
        item = self.get_object()
        if self._failing_back(item):
            _, job = services.failback_commit(item=item, user=request.user)
            return accepted_job(request, job, JobSerializer)
        return super().failover_commit(request, pk)


class FailbackViewSet(VaultScoped, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """failbacks: each item's way home (state, location, the returning replication, and the bytes
    and seconds of each step in ``figures``). Started with the items' ``reProtect``."""

    queryset = Failback.objects.select_related("item", "vcenter", "process_server", "master_target", "recovered_vm",
                                               "returning_item").order_by("-created_at")
    serializer_class = FailbackSerializer
    permission_classes = [VaultRole]
    filterset_fields = ["vault", "item", "state"]



class PlanReprotectSerializer(serializers.Serializer):
    location = serializers.ChoiceField(
        choices=FailbackLocation.choices, default=FailbackLocation.ORIGINAL,
        help_text="ORIGINAL: each item's original VM; ALTERNATE: a new VM <item>-failback per item.")
    processServer = serializers.CharField(required=False, allow_blank=True, max_length=120)
    masterTarget = serializers.CharField(required=False, allow_blank=True, max_length=120)
    vcenter = serializers.CharField(required=False, allow_blank=True, max_length=120)
    targetHost = serializers.CharField(required=False, allow_blank=True, max_length=255)
    targetDatastore = serializers.CharField(required=False, allow_blank=True, max_length=255)
    targetNetwork = serializers.CharField(required=False, allow_blank=True, max_length=255)


class PlanFailBackSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=services.FAILBACK_TYPE_CHOICES, default="planned")
    # Checked by the run's options check (one rule, with a sentence), as the plan's other operations do.
    recoveryPoint = serializers.CharField(required=False, allow_blank=True, default="latest",
                                          help_text=f"Unplanned: {', '.join(PlanRecoveryPoint.values)}.")
    shutDownRecoveredVm = serializers.BooleanField(default=True)


class FailbackRecoveryPlanViewSet(RecoveryPlanViewSet):
    """replicationRecoveryPlans, with failback of the whole plan: reProtect, failBack
    (planned or unplanned), failbackCommit and reEnableReplication run group after group
    (failBack with the groups' actions), each item through its own failback."""

    role_actions = {**RecoveryPlanViewSet.role_actions,
                    **{name: access.OPERATE for name in ("re_protect", "fail_back", "failback_commit", "re_enable")}}

    @extend_schema(request=PlanReprotectSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="reProtect")
    def re_protect(self, request, pk=None):
        """Reprotect every item of the plan (each a committed failover) back on-premises."""
        return self._start(request, PlanOperation.REPROTECT, PlanReprotectSerializer)

    @extend_schema(request=PlanFailBackSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="failBack")
    def fail_back(self, request, pk=None):
        """Fail the plan's items over to on-premises, group after group, with the groups' actions."""
        return self._start(request, PlanOperation.FAILBACK, PlanFailBackSerializer)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="failbackCommit")
    def failback_commit(self, request, pk=None):
        """Commit the failback of every item of the plan."""
        return self._start(request, PlanOperation.FAILBACK_COMMIT)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="reEnableReplication")
    def re_enable(self, request, pk=None):
        """Re-enable replication of every item of the plan to the recovery site."""
        return self._start(request, PlanOperation.REENABLE)
