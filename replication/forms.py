from __future__ import annotations

from django import forms

from vault.models import DiscoveredMachine, ProcessServer, ReplicationPolicy, Vault


class EnableReplicationForm(forms.Form):
    """The enable-replication wizard on one page: source, machines, process server, target, policy."""

    source = forms.ChoiceField(label="Source", help_text="A vCenter of the vault, or machines registered by their agents.")
    machines = forms.ModelMultipleChoiceField(
        queryset=DiscoveredMachine.objects.none(), widget=forms.CheckboxSelectMultiple,
        label="Machines", help_text="One enable-replication job starts per machine.",
    )
    process_server = forms.ModelChoiceField(queryset=ProcessServer.objects.none())
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
