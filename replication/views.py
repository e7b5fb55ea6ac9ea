from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect

from core.portal import current_vault, render_page
from replication.filters import ProtectedItemFilter
from replication.models import ProtectedItem


@login_required
def item_list(request):
    vault = current_vault(request)
    if vault is None:
        return redirect("portal:vault-create")
    qs = ProtectedItem.objects.filter(vault=vault).select_related("policy", "process_server", "machine")
    filterset = ProtectedItemFilter(request.GET, queryset=qs)
    page = Paginator(filterset.qs, 100).get_page(request.GET.get("page"))
    return render_page(request, "replication/item_list.html", {"vault": vault, "filter": filterset, "page": page}, partial="rows")


@login_required
def item_detail(request, pk):
    item = get_object_or_404(
        ProtectedItem.objects.select_related("vault", "policy", "process_server", "machine"), pk=pk
    )
    context = {
        "vault": item.vault,
        "item": item,
        "disks": item.replica_disks.all(),
        "points": item.recovery_points.order_by("-time")[:50],
        "events": item.events.order_by("-created_at")[:20],
    }
    return render_page(request, "replication/item_detail.html", context, partial="status")
