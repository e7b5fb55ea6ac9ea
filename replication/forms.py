from __future__ import annotations

from django import forms

from replication import services
from replication.models import ProtectedItem
from vault.forms import ServiceForm
from vault.models import DiscoveredMachine, NetworkPurpose, ProcessServer, RecoveryNetwork, ReplicationPolicy, Vault


class EnableReplicationForm(forms.Form):
    """The enable-replication wizard on one page: source, machines, process server, target, policy."""

    source = forms.ChoiceField(label="Source", help_text="A vCenter of the vault, or machines registered by their agents.")
    machines = forms.ModelMultipleChoiceField(
        queryset=DiscoveredMachine.objects.none(), widget=forms.CheckboxSelectMultiple,
        label="Machines", help_text="One enable-replication job starts per machine.",
    )
    process_server = forms.ModelChoiceField(
        queryset=ProcessServer.objects.none(), required=False, empty_label="Automatic: the least loaded",
        help_text="Where the agents send the machines' changes. Automatic spreads the machines over the process servers.",
    )
    policy = forms.ModelChoiceField(queryset=ReplicationPolicy.objects.none(), label="Replication policy")

    def __init__(self, *args, vault: Vault, **kwargs):
        super().__init__(*args, **kwargs)
        self.vault = vault
        sources = [(f"vcenter:{vc.pk}", vc.name) for vc in vault.vcenters.all()]
        sources.append(("agent", "Registered machines (mobility agent installed)"))
        self.fields["source"].choices = sources
        source = self.data.get("source") or self.initial.get("source") or (sources[0][0] if sources else "agent")
        machines = vault.machines.filter(missing=False, protected_items__isnull=True).order_by("name")
        if source.startswith("vcenter:"):
            machines = machines.filter(vcenter_id=source.split(":", 1)[1])
        else:
            machines = machines.filter(vcenter__isnull=True)
        self.fields["machines"].queryset = machines
        self.fields["process_server"].queryset = vault.process_servers.all()
        self.fields["policy"].queryset = vault.policies.filter(is_failback=False)
        self.source = source


class NetworkMappingForm(ServiceForm):
    """Where the item's recovered VMs go: its recovery site and that site's networks."""

    recovery_site = forms.ModelChoiceField(queryset=None, label="Recovery site", empty_label=None)
    recovery_network = forms.ModelChoiceField(queryset=None, label="Recovery network", required=False,
                                              help_text="Failover puts the VM here. Empty: the site's first recovery network.")
    test_network = forms.ModelChoiceField(queryset=None, label="Test network", required=False,
                                          help_text="Test failover puts the VM here. Empty: the site's first test network.")

    def __init__(self, *args, item: ProtectedItem, **kwargs):
        kwargs.setdefault("initial", {
            "recovery_site": item.recovery_site_id, "recovery_network": item.recovery_network_id,
            "test_network": item.test_network_id,
        })
        super().__init__(*args, **kwargs)
        self.item = item
        self.fields["recovery_site"].queryset = item.vault.recovery_sites.order_by("name")
        networks = RecoveryNetwork.objects.filter(site__vault=item.vault).select_related("site").order_by("site__name", "name")
        self.fields["recovery_network"].queryset = networks.filter(purpose=NetworkPurpose.RECOVERY)
        self.fields["test_network"].queryset = networks.filter(purpose=NetworkPurpose.TEST)
        self.fields["recovery_network"].label_from_instance = lambda n: f"{n.site.name} / {n.name}"
        self.fields["test_network"].label_from_instance = lambda n: f"{n.site.name} / {n.name}"

    def save(self):
        return self.save_with(services.protected_item_set_recovery, item=self.item, **self.cleaned_data)
