from django.urls import path

from core import views as core_views
from failback import views as failback_views
from recovery_plans import urls as plan_urls
from recovery_plans import views as plan_views
from replication import views as replication_views
from vault import views as vault_views

app_name = "portal"
urlpatterns = [
    path("", vault_views.overview, name="overview"),
    path("vaults/new/", vault_views.vault_create, name="vault-create"),
    path("vault/settings/", vault_views.vault_settings, name="vault-settings"),
    path("vault/access/add/", vault_views.role_add, name="role-add"),
    path("vault/access/<int:pk>/remove/", vault_views.role_remove, name="role-remove"),
    path("infrastructure/", vault_views.infrastructure, name="infrastructure"),
    path("infrastructure/machines/", vault_views.machine_list, name="machines"),
    path("infrastructure/vcenters/add/", vault_views.vcenter_add, name="vcenter-add"),
    path("infrastructure/vcenters/<int:pk>/discover/", vault_views.vcenter_discover_view, name="vcenter-discover"),
    path("infrastructure/agent-registrations/<uuid:pk>/<str:decision>/", replication_views.agent_registration_decide,
         name="agent-registration-decide"),
    path("infrastructure/recovery-sites/", vault_views.recovery_site_list, name="recovery-sites"),
    path("infrastructure/recovery-sites/add/", vault_views.recovery_site_add, name="recovery-site-add"),
    path("policies/", vault_views.policy_list, name="policies"),
    path("policies/new/", vault_views.policy_edit, name="policy-create"),
    path("policies/<int:pk>/", vault_views.policy_edit, name="policy-edit"),
    path("alerts/", vault_views.alert_list, name="alerts"),
    path("events/", vault_views.event_list, name="events"),
    path("alerts/<uuid:pk>/acknowledge/", vault_views.alert_acknowledge_view, name="alert-acknowledge"),
    path("items/", replication_views.item_list, name="items"),
    path("items/enable/", replication_views.enable_replication, name="enable"),
    path("items/<uuid:pk>/", replication_views.item_detail, name="item-detail"),
    path("items/<uuid:pk>/workload/", replication_views.workload_update, name="item-workload"),
    path("items/<uuid:pk>/network-mapping/", replication_views.network_mapping_update, name="item-network-mapping"),
    path("items/<uuid:pk>/recovery/<slug:operation>/", plan_views.item_recovery, name="item-recovery"),
    path("items/<uuid:pk>/failback/<slug:operation>/", failback_views.item_failback, name="item-failback"),
    path("items/<uuid:pk>/<str:action>/", replication_views.item_action, name="item-action"),
    *plan_urls.urlpatterns,
    path("jobs/", core_views.job_list, name="jobs"),
    path("jobs/<uuid:pk>/", core_views.job_detail, name="job-detail"),
    path("jobs/<uuid:pk>/cancel/", core_views.job_cancel_view, name="job-cancel"),
    path("jobs/<uuid:pk>/resume/", core_views.job_resume_view, name="job-resume"),
    path("account/tokens/", core_views.token_list, name="tokens"),
    path("account/tokens/<int:pk>/revoke/", core_views.token_revoke_view, name="token-revoke"),
]
