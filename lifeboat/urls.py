from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from core.signin import AdminSignInForm, SignInView
from lifeboat.metrics import metrics_view

# The admin site's sign-in limits wrong passwords like the portal's (core/signin.py).
admin.site.login_form = AdminSignInForm

urlpatterns = [
    path("admin/", admin.site.urls),
    path("login/", SignInView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("api/v1/", include("lifeboat.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("metrics", metrics_view, name="metrics"),  # Prometheus (lifeboat/metrics.py)
    path("", include("lifeboat.portal_urls")),
]

handler400 = "core.api.bad_request_view"
handler404 = "core.api.not_found_view"
handler500 = "core.api.server_error_view"
