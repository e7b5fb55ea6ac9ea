from __future__ import annotations

import django_filters
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from core.choices import JobState
from core.filters import IdFilter
from core.jobs import job_cancel, job_resume
from core.models import ApiToken, Job
from core import access
from core.permissions import VaultRole, VaultScoped
from core.tokens import token_create, token_revoke


class JobStepSerializer(serializers.Serializer):
    name = serializers.CharField()
    state = serializers.CharField()
    progress = serializers.IntegerField()
    message = serializers.CharField(required=False)
    started_at = serializers.DateTimeField(required=False)
    ended_at = serializers.DateTimeField(required=False)
    # A recovery plan's script action: exit_code, timed_out, stdout, stderr (their ends), seconds.
    script = serializers.JSONField(required=False)


class JobSerializer(serializers.ModelSerializer):
    steps = JobStepSerializer(many=True, read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    children = serializers.PrimaryKeyRelatedField(many=True, read_only=True)

    class Meta:
        model = Job
        fields = [
            "id", "vault", "type", "state", "target_type", "target_id", "target_name", "params", "steps",
            "progress", "error", "result", "created_by", "cancel_requested", "created_at", "started_at",
            "ended_at", "heartbeat_at", "waiting_for", "wake_at", "parent", "children",
        ]
        read_only_fields = fields


class JobFilter(django_filters.FilterSet):
    vault = IdFilter(field_name="vault_id")
    target_name = django_filters.CharFilter(lookup_expr="icontains")
    active = django_filters.BooleanFilter(method="filter_active")

    class Meta:
        model = Job
        fields = ["vault", "type", "state", "target_type", "target_id", "parent"]

    def filter_active(self, queryset, name, value):
        return queryset.filter(state__in=JobState.ACTIVE) if value else queryset.exclude(state__in=JobState.ACTIVE)


class JobViewSet(VaultScoped, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """replicationJobs: every long-running operation, with its steps and progress."""

    role_actions = {"cancel": access.OPERATE, "resume": access.OPERATE}
    queryset = Job.objects.select_related("created_by").prefetch_related("children").order_by("-created_at")
    serializer_class = JobSerializer
    filterset_class = JobFilter
    permission_classes = [VaultRole]
    ordering_fields = ["created_at", "state", "type"]

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = job_cancel(job_id=self.get_object().pk, user=request.user)
        job.refresh_from_db()
        return Response(JobSerializer(job, context={"request": request}).data)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        """A waiting job looks again now; a manual action it waits for counts as done (409 if
        the job is not waiting)."""
        job = job_resume(job_id=self.get_object().pk, user=request.user)
        return Response(JobSerializer(job, context={"request": request}).data)


class ApiTokenSerializer(serializers.ModelSerializer):
    state = serializers.CharField(read_only=True, help_text="active, expired or revoked")

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "state", "created_at", "expires_at", "last_used_at", "revoked_at"]
        read_only_fields = ["id", "prefix", "state", "created_at", "last_used_at", "revoked_at"]
        extra_kwargs = {"expires_at": {"required": False, "allow_null": True}}


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    secret = serializers.CharField(read_only=True, help_text="The token itself: shown this once, never again.")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "secret"]


class ApiTokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """apiTokens: the caller's own personal API tokens. Creating one answers its secret once;
    DELETE revokes it (it stays listed as revoked). Nobody sees another user's tokens."""

    serializer_class = ApiTokenSerializer
    queryset = ApiToken.objects.none()
    filterset_fields: list[str] = []
    ordering_fields = ["created_at", "name"]

    def get_queryset(self):
        return ApiToken.objects.filter(user=self.request.user)

    @extend_schema(request=ApiTokenSerializer, responses={201: ApiTokenCreatedSerializer})
    def create(self, request):
        serializer = ApiTokenSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token, secret = token_create(user=request.user, **serializer.validated_data)
        token.secret = secret
        return Response(ApiTokenCreatedSerializer(token).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        token_revoke(user=self.request.user, token_id=instance.pk)
