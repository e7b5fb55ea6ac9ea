from django.contrib.auth.decorators import login_required
from django.db.models import Count, Prefetch
from django.shortcuts import redirect, render

from core.portal import current_vault
from recovery_plans.models import RecoveryPlanGroup


@login_required
def plan_list(request):
    vault = current_vault(request)
    if vault is None:
        return redirect("portal:vault-create")
    plans = vault.recovery_plans.prefetch_related(
        Prefetch("groups", queryset=RecoveryPlanGroup.objects.annotate(item_count=Count("items")))
    )
    return render(request, "recovery_plans/plan_list.html", {"vault": vault, "plans": plans})
