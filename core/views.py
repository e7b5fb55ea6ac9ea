from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_POST

from core.api_views import JobFilter
from core.exceptions import LifeboatError
from core.jobs import job_cancel, job_resume
from core.models import Job
from core.portal import HTMX_STOP_POLLING, current_vault, filtered, render_page


@login_required
def job_list(request):
    vault = current_vault(request)
    qs = Job.objects.filter(vault=vault).select_related("created_by") if vault else Job.objects.none()
    filterset = JobFilter(request.GET, queryset=qs)
    page = Paginator(filtered(request, filterset), 50).get_page(request.GET.get("page"))
    return render_page(request, "core/job_list.html", {"vault": vault, "filter": filterset, "page": page}, partial="rows")


@login_required
def job_detail(request, pk):
    job = get_object_or_404(Job.objects.select_related("created_by", "vault"), pk=pk)
    response = render_page(request, "core/job_detail.html", {"job": job, "vault": job.vault}, partial="progress")
    if request.htmx and job.is_terminal:
        response.status_code = HTMX_STOP_POLLING
    return response


@login_required
@require_POST
def job_cancel_view(request, pk):
    if not request.user.is_staff:
        messages.error(request, "Only administrators can cancel jobs.")
    else:
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
    if not request.user.is_staff:
        messages.error(request, "Only administrators can resume jobs.")
    else:
        try:
            job_resume(job_id=pk, user=request.user)
            messages.info(request, "The job goes on.")
        except LifeboatError as exc:
            messages.error(request, exc.message)
    return redirect("portal:job-detail", pk=pk)
