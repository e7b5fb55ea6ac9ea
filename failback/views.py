from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render

from core import access
from core.portal import require, visible_or_404
from failback import forms as failback_forms
from failback import services
from replication.models import ProtectedItem

# operation (in the URL) -> (form, page title, submit button, intro)
OPERATIONS = {
    "reprotect": (
        failback_forms.ReprotectForm, "Reprotect", "Reprotect",
        "Replicates the recovered VM back on-premises: an agent is pushed into it and sends to the process server "
        "in the recovery site; the master target server writes on-premises. To the original VM, its disks are "
        "compared block by block and only what differs is sent; to an alternate location (a new VM on another host, "
        "datastore or vCenter) everything is copied.",
    ),
    "failback": (
        failback_forms.FailbackForm, "Fail over to on-premises", "Fail over to on-premises",
        "Brings the VM home: a planned failover shuts the recovered VM down and applies its last writes on-premises "
        "(no data loss); the on-premises disks are checked against the returning replica before the VM powers on.",
    ),
    "commit": (
        failback_forms.FailbackCommitForm, "Commit failback", "Commit",
        "Makes the failback final. Then re-enable replication to protect the VM again.",
    ),
    "reenable": (
        failback_forms.ReenableForm, "Re-enable replication", "Re-enable replication",
        "Protects the on-premises VM again, to the recovery site: it is compared with the replica still there and "
        "only what differs is sent. The item is back to Protected in its original direction, with its history.",
    ),
}


@login_required
def item_failback(request, pk, operation):
    """One failback step's short form; a valid submit starts the job and shows it."""
    if operation not in OPERATIONS:
        raise Http404("No such failback operation.")
    form_class, title, submit_label, intro = OPERATIONS[operation]
    item = visible_or_404(ProtectedItem.objects.select_related("vault", "machine", "machine__vcenter"), request, pk=pk)
    require(request, item.vault_id, access.OPERATE)
    status = 200
    if request.method == "POST":
        form = form_class(request.POST, item=item)
        if form.is_valid():
            job = form.submit(user=request.user)
            if job is not None:
                messages.success(request, f"{title} of {item.name} started.")
                return redirect("portal:job-detail", pk=job.pk)
            status = 409 if form.conflict else 400
        else:
            status = 400
    else:
        if operation not in {op for op, _label in services.failback_operations(item=item)}:
            messages.error(request, f"{title} is not possible now: {item.name} is "
                                    f"{item.get_protection_state_display().lower()}.")
            return redirect("portal:item-detail", pk=item.pk)
        form = form_class(item=item)
    context = {"vault": item.vault, "item": item, "form": form, "title": title, "submit_label": submit_label,
               "intro": intro, "operation": operation, "failback": services.current_failback(item=item)}
    return render(request, "failback/item_failback.html", context, status=status)
