"""replicationRecoveryPlans/{id}/...: running a plan (testFailover, testFailoverCleanup,
plannedFailover, unplannedFailover, failoverCommit) and steering its run (resume, cancel,
retry, continue, runs)."""
from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.decorators import action
from rest_framework.response import Response

from core.api import accepted_job
from core.api_views import JobSerializer
from recovery_plans import runs as plan_runs
from recovery_plans.run_models import PlanOperation, RecoveryPlanRun


class PlanRunSerializer(serializers.ModelSerializer):
    waiting_for = serializers.SerializerMethodField(help_text="While waiting for a manual action: its instructions.")

    class Meta:
        model = RecoveryPlanRun
        fields = ["id", "plan", "operation", "state", "job", "options", "items", "stopped_stage", "message",
                  "waiting_for", "created_at", "updated_at"]
        read_only_fields = fields

    def get_waiting_for(self, run) -> str:
        return run.job.waiting_for if run.state == "WAITING_FOR_ACTION" and run.job else ""


class PlanPointSerializer(serializers.Serializer):
    # Checked by the service (one rule, with a sentence): one of plan_runs.PLAN_POINTS.
    recoveryPoint = serializers.CharField(
        required=False, allow_blank=True,
        help_text=f"How each item's point is chosen: {', '.join(plan_runs.PLAN_POINTS)} (default: the plan's recovery point type).",
    )


class PlanNetworkSerializer(serializers.Serializer):
    network = serializers.CharField(
        required=False, allow_blank=True,
        help_text="A network name at every item's recovery site (default: the plan's mapping, else each item's own).",
    )


class PlanTestFailoverSerializer(PlanPointSerializer, PlanNetworkSerializer):
    pass


class PlanCleanupSerializer(serializers.Serializer):
    comments = serializers.CharField(required=False, allow_blank=True, default="", max_length=4000)


class PlanPlannedFailoverSerializer(PlanNetworkSerializer):
    pass


class PlanUnplannedFailoverSerializer(PlanPointSerializer, PlanNetworkSerializer):
    shutDownSource = serializers.BooleanField(required=False, default=True)


class RecoveryPlanRunActions:
    """Mixed into the plan viewset: one action per operation (202 + the plan job, whose
    children are the items' jobs), and the run's controls."""

    def _start(self, request, operation: str, serializer_class=None):
        options = {}
        if serializer_class is not None:
            body = serializer_class(data=request.data)
            body.is_valid(raise_exception=True)
            options = dict(body.validated_data)
        _, job = plan_runs.recovery_plan_run_start(plan=self.get_object(), operation=operation, options=options,
                                              user=request.user)
        return accepted_job(request, job, JobSerializer)

    @extend_schema(request=PlanTestFailoverSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="testFailover")
    def test_failover(self, request, pk=None):
        """Drill the plan: test failover of its groups in order, with their actions."""
        return self._start(request, PlanOperation.TEST_FAILOVER, PlanTestFailoverSerializer)

    @extend_schema(request=PlanCleanupSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="testFailoverCleanup")
    def test_failover_cleanup(self, request, pk=None):
        """Remove every test VM of the plan's drill; the comments are kept with each."""
        return self._start(request, PlanOperation.TEST_FAILOVER_CLEANUP, PlanCleanupSerializer)

    @extend_schema(request=PlanPlannedFailoverSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="plannedFailover")
    def planned_failover(self, request, pk=None):
        """Planned failover of the plan's groups in order (no data lost), with their actions."""
        return self._start(request, PlanOperation.PLANNED_FAILOVER, PlanPlannedFailoverSerializer)

    @extend_schema(request=PlanUnplannedFailoverSerializer, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="unplannedFailover")
    def unplanned_failover(self, request, pk=None):
        """Unplanned failover of the plan's groups in order, to the chosen points, with their actions."""
        return self._start(request, PlanOperation.UNPLANNED_FAILOVER, PlanUnplannedFailoverSerializer)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="failoverCommit")
    def failover_commit(self, request, pk=None):
        """Commit the failover of every item of the plan."""
        return self._start(request, PlanOperation.FAILOVER_COMMIT)

    @extend_schema(request=None, responses=PlanRunSerializer)
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        """The manual action the plan waits for is done: the plan goes on (409 if it waits for none)."""
        run = plan_runs.recovery_plan_run_resume(plan=self.get_object(), user=request.user)
        return Response(PlanRunSerializer(run).data)

    @extend_schema(request=None, responses=PlanRunSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Stop the plan's run at its next safe point (between stages); started items finish."""
        run = plan_runs.recovery_plan_run_cancel(plan=self.get_object(), user=request.user)
        return Response(PlanRunSerializer(run).data)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        """A failed run goes on from where it stopped: the failed items of the group (or the failed
        action) again, then the rest. 202 + the new plan job."""
        run, job = plan_runs.recovery_plan_run_retry(plan=self.get_object(), user=request.user)
        return accepted_job(request, job, JobSerializer) if job else Response(PlanRunSerializer(run).data)

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"], url_path="continue")
    def continue_run(self, request, pk=None):
        """A failed run goes on after where it stopped, leaving the failed items (or action) as
        they are. 202 + the new plan job (200 + the run, succeeded, when nothing was left to run)."""
        run, job = plan_runs.recovery_plan_run_retry(plan=self.get_object(), skip_failed=True, user=request.user)
        return accepted_job(request, job, JobSerializer) if job else Response(PlanRunSerializer(run).data)

    @extend_schema(request=None, responses=PlanRunSerializer(many=True))
    @action(detail=True, methods=["get"])
    def runs(self, request, pk=None):
        """The plan's runs, newest first, with each item's outcome."""
        plan_runs = RecoveryPlanRun.objects.filter(plan=self.get_object()).select_related("job").order_by("-created_at")
        return Response(PlanRunSerializer(plan_runs[:50], many=True).data)
