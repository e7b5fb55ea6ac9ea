from django.db.models import Prefetch
from drf_spectacular.utils import extend_schema
from rest_framework import viewsets
from rest_framework.decorators import action

from core.api import accepted_job
from core.api_views import JobSerializer
from core import access
from core.permissions import VaultRole, VaultScoped
from recovery_plans import services
from recovery_plans.api import serializers as rs
from recovery_plans.api.runs import RecoveryPlanRunActions
from recovery_plans.api.serializers import RecoveryPlanSerializer
from recovery_plans.models import RecoveredVm
from recovery_plans.services import recovery_plans_for_vault
from replication.api.views import ProtectedItemViewSet


class RecoveryPlanViewSet(VaultScoped, RecoveryPlanRunActions, viewsets.ModelViewSet):
    """replicationRecoveryPlans: ordered groups of items that fail over together, with pre-
    and post-actions per group (a script with a timeout, or a manual action with
    instructions) and the plan's defaults (recovery point type, network mapping per site).

    Each plan says its state as a whole (ready, not ready and why, test failover under way,
    failed over, ...) and each item's. A bad plan (no items, an item in two groups or of
    another vault, a script without a command, a timeout out of range) is a 400 that
    changes nothing; a name already used in the vault is a 409.
    """

    # Running the plan is operating it; editing it is managing the vault.
    role_actions = {name: access.OPERATE for name in (
        "test_failover", "test_failover_cleanup", "planned_failover", "unplanned_failover", "failover_commit",
        "resume", "cancel", "retry", "continue_run")}
    queryset = recovery_plans_for_vault()
    serializer_class = RecoveryPlanSerializer
    permission_classes = [VaultRole]
    filterset_fields = ["vault", "name"]

    def perform_destroy(self, instance):
        services.recovery_plan_delete(plan=instance)


# --- recovery actions on protected items ----------------------------------------------------
# replication's viewset cannot import recovery_plans (imports run core <- vault <- replication
# <- recovery_plans), so the recovery actions live on this subclass, routed in its place as
# replicationProtectedItems in lifeboat/api_urls.py.


class RecoveryProtectedItemViewSet(ProtectedItemViewSet):
    """replicationProtectedItems: replicated VMs with their state, health and RPO, and the VMs
    recovered from them.

    POST enables replication (202 + the job), DELETE disables it (202 + the job), PATCH sets
    the recovery site and network mapping. Recovery operations (testFailover,
    testFailoverCleanup, plannedFailover, unplannedFailover, applyRecoveryPoint,
    failoverCommit) answer 202 with the job and a Location header; one the item's state does
    not allow (or a second one while one runs) is 409 with the current state.
    """

    queryset = ProtectedItemViewSet.queryset.prefetch_related(
        Prefetch("recovered_vms", queryset=RecoveredVm.objects.select_related("site", "network").order_by("-created_at"))
    )
    serializer_class = rs.ProtectedItemRecoverySerializer

    def _body(self, serializer_class):
        s = serializer_class(data=self.request.data)
        s.is_valid(raise_exception=True)
        return s.validated_data

    @extend_schema(request=rs.TestFailoverSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="testFailover")
    def test_failover(self, request, pk=None):
        """Test failover (DR drill): a copy from the chosen point in the isolated test network."""
        data = self._body(rs.TestFailoverSerializer)
        _, job = services.protected_item_test_failover(
            item=self.get_object(), point=data["recoveryPoint"], recovery_point_id=data.get("recoveryPointId") or None,
            network=data.get("network") or None, user=request.user,
        )
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=rs.TestFailoverCleanupSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="testFailoverCleanup")
    def test_failover_cleanup(self, request, pk=None):
        """Remove the test VM and its disks; the comments are kept with it."""
        data = self._body(rs.TestFailoverCleanupSerializer)
        _, job = services.protected_item_test_failover_cleanup(item=self.get_object(), notes=data["comments"], user=request.user)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=rs.PlannedFailoverSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="plannedFailover")
    def planned_failover(self, request, pk=None):
        """Planned failover: shut the source down, replicate its last writes, recover with no data lost."""
        data = self._body(rs.PlannedFailoverSerializer)
        _, job = services.protected_item_planned_failover(item=self.get_object(), network=data.get("network") or None, user=request.user)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=rs.UnplannedFailoverSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="unplannedFailover")
    def unplanned_failover(self, request, pk=None):
        """Unplanned failover to the chosen point (the source is shut down first if asked and reachable)."""
        data = self._body(rs.UnplannedFailoverSerializer)
        _, job = services.protected_item_unplanned_failover(
            item=self.get_object(), point=data["recoveryPoint"], recovery_point_id=data.get("recoveryPointId") or None,
            shut_down_source=data["shutDownSource"], network=data.get("network") or None, user=request.user,
        )
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=rs.ApplyRecoveryPointSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="applyRecoveryPoint")
    def apply_recovery_point(self, request, pk=None):
        """Change recovery point: swap the failed-over VM's disks to another point (before commit)."""
        data = self._body(rs.ApplyRecoveryPointSerializer)
        _, job = services.protected_item_apply_recovery_point(
            item=self.get_object(), point=data["recoveryPoint"], recovery_point_id=data.get("recoveryPointId") or None,
            user=request.user,
        )
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="failoverCommit")
    def failover_commit(self, request, pk=None):
        """Make the failover final and release the recovery points no longer needed."""
        _, job = services.protected_item_failover_commit(item=self.get_object(), user=request.user)
        return accepted_job(request, job, JobSerializer)
