from django.db.models import Prefetch
from rest_framework import viewsets

from core.permissions import ReadOrAdmin
from recovery_plans.api.serializers import RecoveryPlanSerializer
from recovery_plans.models import RecoveryPlan, RecoveryPlanGroup


class RecoveryPlanViewSet(viewsets.ModelViewSet):
    """replicationRecoveryPlans: ordered groups of items that fail over together."""

    queryset = RecoveryPlan.objects.prefetch_related(
        Prefetch("groups", queryset=RecoveryPlanGroup.objects.prefetch_related("items", "actions"))
    )
    serializer_class = RecoveryPlanSerializer
    permission_classes = [ReadOrAdmin]
    filterset_fields = ["vault", "name"]
