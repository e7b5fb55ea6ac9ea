from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect
from django.utils import timezone
from django.views.decorators.http import require_POST

from core.api_views import JobFilter
from core.exceptions import LifeboatError
from core.jobs import job_cancel, job_resume
from core.models import ApiToken, Job
from core import access
from core.portal import HTMX_STOP_POLLING, current_vault, filtered, render_page, require, visible_or_404
from core.tables import Sorting, table_page
from core.tokens import token_create, token_revoke
from core.validators import single_line


JOB_SORTING = Sorting(columns={
    "created_at": ("created_at",), "type": ("type",), "target_name": ("target_name",), "state": ("state",),
    "progress": ("progress",),
}, default="-created_at")


@login_required
def job_list(request):
    vault = current_vault(request)
    qs = Job.objects.filter(vault=vault).select_related("created_by") if vault else Job.objects.none()
    filterset = JobFilter(request.GET, queryset=qs)
    page, ordering = table_page(request, filtered(request, filterset), sorting=JOB_SORTING, per_page=50)
    return render_page(request, "core/job_list.html",
                       {"vault": vault, "filter": filterset, "page": page, "ordering": ordering}, partial="rows")


@login_required
def job_detail(request, pk):
    job = visible_or_404(Job.objects.select_related("created_by", "vault"), request, pk=pk)
    response = render_page(request, "core/job_detail.html",
                           {"job": job, "vault": job.vault, "can": access.capabilities(request.user, job.vault_id)},
                           partial="progress")
    if request.htmx and job.is_terminal:
        response.status_code = HTMX_STOP_POLLING
    return response


@login_required
@require_POST
def job_cancel_view(request, pk):
    job = visible_or_404(Job.objects.all(), request, pk=pk)
    require(request, job.vault_id, access.OPERATE)
    try:
        job_cancel(job_id=pk, user=request.user)
        messages.info(request, "Cancellation requested.")
    except LifeboatError as exc:
        messages.error(request, exc.message)
    return redirect("portal:job-detail", pk=pk)


@login_required
@require_POST
def job_resume_view(request, pk):
    """Resume a waiting job: it looks again now; a manual action it waits for is done."""
    job = visible_or_404(Job.objects.all(), request, pk=pk)
    require(request, job.vault_id, access.OPERATE)
    try:
        job_resume(job_id=pk, user=request.user)
        messages.info(request, "The job goes on.")
    except LifeboatError as exc:
        messages.error(request, exc.message)
    return redirect("portal:job-detail", pk=pk)


class ApiTokenForm(forms.Form):
    EXPIRY_CHOICES = [("", "Never"), ("7", "In 7 days"), ("30", "In 30 days"), ("90", "In 90 days"), ("365", "In a year")]

    name = forms.CharField(max_length=100, validators=[single_line], help_text="What uses it, e.g. \"nightly DR report\".")
    expires_in_days = forms.TypedChoiceField(
        label="Expires", choices=EXPIRY_CHOICES, coerce=int, empty_value=None, required=False
    )


@login_required
def token_list(request):
    """The signed-in user's API tokens: create (the secret is shown on this answer only),
    list and revoke."""
    form = ApiTokenForm(request.POST or None)
    secret = None
    status = 200
    if request.method == "POST":
        if form.is_valid():
            days = form.cleaned_data["expires_in_days"]
            expires_at = timezone.now() + timedelta(days=days) if days else None
            try:
                token, secret = token_create(user=request.user, name=form.cleaned_data["name"], expires_at=expires_at)
            except LifeboatError as exc:
                form.add_error(None, exc.message)
        if secret is None:
            status = 400
        else:
            messages.success(request, f"Token {token.name!r} created. Copy it now: it is not shown again.")
            form = ApiTokenForm()
    tokens = ApiToken.objects.filter(user=request.user)
    response = render_page(request, "core/token_list.html", {"form": form, "tokens": tokens, "secret": secret}, status=status)
    if secret:
        response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def token_revoke_view(request, pk):
    try:
        token = token_revoke(user=request.user, token_id=pk)
    except LifeboatError as exc:
        messages.error(request, exc.message)
    else:
        messages.info(request, f"Token {token.name!r} revoked: it is refused from now on.")
    return redirect("portal:tokens")
