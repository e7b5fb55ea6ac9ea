from __future__ import annotations

import django_filters
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from core.jobs import job_cancel
from core.models import Job
from core.permissions import ReadOrAdmin


class JobStepSerializer(serializers.Serializer):
    name = serializers.CharField()
    state = serializers.CharField()
    progress = serializers.IntegerField()
    message = serializers.CharField(required=False)
    started_at = serializers.DateTimeField(required=False)
    ended_at = serializers.DateTimeField(required=False)


class JobSerializer(serializers.ModelSerializer):
    steps = JobStepSerializer(many=True, read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Job
        fields = [
            "id", "vault", "type", "state", "target_type", "target_id", "target_name", "params", "steps",
            "progress", "error", "result", "created_by", "cancel_requested", "created_at", "started_at",
            "ended_at", "heartbeat_at",
        ]
        read_only_fields = fields


class JobFilter(django_filters.FilterSet):
    vault = django_filters.NumberFilter(field_name="vault_id")
    active = django_filters.BooleanFilter(method="filter_active")

    class Meta:
        model = Job
        fields = ["vault", "type", "state", "target_type", "target_id"]

    def filter_active(self, queryset, name, value):
        from core.choices import JobState

        return queryset.filter(state__in=JobState.ACTIVE) if value else queryset.exclude(state__in=JobState.ACTIVE)


class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """replicationJobs: every long-running operation, with its steps and progress."""

    queryset = Job.objects.select_related("created_by").order_by("-created_at")
    serializer_class = JobSerializer
    filterset_class = JobFilter
    permission_classes = [ReadOrAdmin]
    ordering_fields = ["created_at", "state", "type"]

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = job_cancel(job_id=self.get_object().pk, user=request.user)
        job.refresh_from_db()
        return Response(JobSerializer(job, context={"request": request}).data)
