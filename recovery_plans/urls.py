"""The portal's recovery plan pages (included in the portal's URLs, namespace ``portal``)."""
from django.urls import path

from recovery_plans import run_views, views

urlpatterns = [
    path("plans/", views.plan_list, name="plans"),
    path("plans/new/", views.plan_create, name="plan-create"),
    path("plans/<int:pk>/", views.plan_detail, name="plan-detail"),
    path("plans/<int:pk>/edit/<slug:operation>/", views.plan_edit, name="plan-edit"),
    path("plans/<int:pk>/delete/", views.plan_delete, name="plan-delete"),
    path("plans/<int:pk>/run/", run_views.plan_run_panel, name="plan-run"),
    path("plans/<int:pk>/run/<slug:operation>/", run_views.plan_run_operation, name="plan-run-operation"),
]
