"""The portal's failback forms: reprotect, fail over to on-premises, commit, re-enable.

Like the recovery forms (``recovery_plans.forms.RecoveryForm``), each knows its item, offers
only what the vault has, and turns a refusal of the service into a form error."""
from __future__ import annotations

from django import forms

from failback import services
from failback.models import FailbackLocation
from recovery_plans.forms import NEWEST_POINTS, RecoveryForm, point_choices
from vault.choices import Site
from vault.models import MasterTargetServer, ProcessServer, VCenter


class ReprotectForm(RecoveryForm):
    location = forms.ChoiceField(choices=FailbackLocation.choices, initial=FailbackLocation.ORIGINAL,
                                 widget=forms.RadioSelect, label="Fail back to")
    process_server = forms.ModelChoiceField(queryset=ProcessServer.objects.none(), empty_label=None,
                                            label="Process server in the recovery site",
                                            help_text="The recovered VM's agent sends its changes here.")
    master_target = forms.ModelChoiceField(queryset=MasterTargetServer.objects.none(), empty_label=None,
                                           label="Master target server (on-premises)",
                                           help_text="It writes the on-premises disks.")
    vcenter = forms.ModelChoiceField(queryset=VCenter.objects.none(), empty_label=None, label="On-premises vCenter")
    target_name = forms.CharField(required=False, max_length=80, label="New VM's name (alternate location)")
    target_host = forms.CharField(required=False, max_length=255, label="Host (alternate location; empty: the first)")
    target_datastore = forms.CharField(required=False, max_length=255,
                                       label="Datastore (alternate location; empty: the first)")
    target_network = forms.CharField(required=False, max_length=255,
                                     label="Network (alternate location; empty: the first)")

    def __init__(self, *args, item, **kwargs):
        super().__init__(*args, item=item, **kwargs)
        self.fields["process_server"].queryset = ProcessServer.objects.filter(vault=item.vault, site=Site.RECOVERY)
        self.fields["master_target"].queryset = MasterTargetServer.objects.filter(vault=item.vault, site=Site.PRIMARY)
        self.fields["vcenter"].queryset = VCenter.objects.filter(vault=item.vault).exclude(host__in=list(
            item.vault.recovery_sites.values_list("host", flat=True)))
        self.fields["vcenter"].initial = item.machine.vcenter_id
        self.fields["target_name"].initial = f"{item.name}-failback"
        self.fields["process_server"].required = self.fields["master_target"].required = False
        self.fields["confirm"] = forms.BooleanField(
            label=f"Replicate {item.name}'s recovered VM back on-premises (only what differs is sent to its original VM)")

    def submit(self, *, user):
        d = self.cleaned_data
        return self._call(services.failback_reprotect, location=d["location"], process_server=d["process_server"],
                          master_target=d["master_target"], vcenter=d["vcenter"], target_name=d["target_name"],
                          target_host=d["target_host"], target_datastore=d["target_datastore"],
                          target_network=d["target_network"], user=user)


class FailbackForm(RecoveryForm):
    kind = forms.ChoiceField(
        label="Failover to on-premises", widget=forms.RadioSelect, initial="planned",
        choices=[
            ("planned", "Planned: shut the recovered VM down, bring its last writes home, no data loss"),
            ("unplanned", "Unplanned: the recovery site is lost; use the recovery point chosen below"),
        ],
    )
    point = forms.ChoiceField(label="Recovery point of the returning replication (unplanned)", choices=[("Newest", NEWEST_POINTS)])
    shut_down = forms.BooleanField(required=False, initial=True,
                                   label="Power off the recovered VM if it can be reached (unplanned)")

    def __init__(self, *args, item, **kwargs):
        super().__init__(*args, item=item, **kwargs)
        failback = services.current_failback(item=item)
        if failback is not None and failback.returning_item is not None:
            self.fields["point"].choices = point_choices(failback.returning_item)
        self.fields["point"].initial = "latest"
        self.fields["confirm_name"] = self._confirm_name_field("fail it back")

    def submit(self, *, user):
        point = self._point()
        return self._call(services.failback_failover, failover_type=self.cleaned_data["kind"],
                          point=point["point"], recovery_point_id=point.get("recovery_point_id"),
                          shut_down=self.cleaned_data["shut_down"], user=user)


class FailbackCommitForm(RecoveryForm):
    def __init__(self, *args, item, **kwargs):
        super().__init__(*args, item=item, **kwargs)
        self.fields["confirm"] = forms.BooleanField(label=f"{item.name} runs on-premises for good: commit the failback")

    def submit(self, *, user):
        return self._call(services.failback_commit, user=user)


class ReenableForm(RecoveryForm):
    def __init__(self, *args, item, **kwargs):
        super().__init__(*args, item=item, **kwargs)
        self.fields["confirm"] = forms.BooleanField(
            label=f"Replicate {item.name} to the recovery site again (only what differs from the replica there is sent); "
                  "the recovered VM there is deleted")

    def submit(self, *, user):
        return self._call(services.failback_reenable, user=user)
