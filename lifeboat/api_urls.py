from django.urls import path
from rest_framework.routers import DefaultRouter

from core.api_views import ApiTokenViewSet, JobViewSet
from failback.api import FailbackProtectedItemViewSet, FailbackRecoveryPlanViewSet, FailbackViewSet
from replication.api import agents
from replication.api.agent_admin import AgentRegistrationViewSet, AgentViewSet
from replication.api.groups import ReplicationGroupViewSet
from replication.api.views import RecoveryPointViewSet
from vault.api import views as v

router = DefaultRouter()
router.trailing_slash = "/?"  # every route answers with or without a trailing slash
router.register("vaults", v.VaultViewSet)
router.register("configurationServers", v.ConfigurationServerViewSet)
router.register("processServers", v.ProcessServerViewSet)
router.register("masterTargetServers", v.MasterTargetServerViewSet)
router.register("replicationvCenters", v.VCenterViewSet)
router.register("replicationProtectableItems", v.MachineViewSet, basename="machine")
router.register("replicationPolicies", v.PolicyViewSet)
# The item viewset with the recovery actions (testFailover, plannedFailover, ...: they live in
# recovery_plans) and failback (reProtect, failBack, ...: in failback), because replication
# imports neither.
router.register("replicationProtectedItems", FailbackProtectedItemViewSet, basename="protecteditem")
router.register("failbacks", FailbackViewSet)
router.register("recoveryPoints", RecoveryPointViewSet)
router.register("replicationGroups", ReplicationGroupViewSet)
router.register("recoverySites", v.RecoverySiteViewSet)
router.register("replicationRecoveryPlans", FailbackRecoveryPlanViewSet)
router.register("replicationJobs", JobViewSet, basename="job")
router.register("replicationEvents", v.EventViewSet)
router.register("replicationAlerts", v.AlertViewSet)
router.register("apiTokens", ApiTokenViewSet, basename="apitoken")
router.register("agents", AgentViewSet)
router.register("agentRegistrations", AgentRegistrationViewSet)
router.register("roleAssignments", v.RoleAssignmentViewSet)

app_name = "api"
urlpatterns = [
    path("agents/register", agents.agent_register, name="agent-register"),
    path("agents/registrations/<uuid:registration_id>", agents.agent_registration_status, name="agent-registration-status"),
    path("agents/<uuid:agent_id>/assignment", agents.agent_assignment, name="agent-assignment"),
    path("agents/<uuid:agent_id>/heartbeat", agents.agent_heartbeat, name="agent-heartbeat"),
    path("agents/<uuid:agent_id>/events", agents.agent_event, name="agent-events"),
    path("processServers/<int:pk>/heartbeat", agents.process_server_heartbeat, name="process-server-heartbeat"),
    path("processServers/<int:pk>/uploaded", agents.process_server_uploaded, name="process-server-uploaded"),
    *router.urls,
]
