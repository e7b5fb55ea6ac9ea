from __future__ import annotations

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from core.exceptions import LifeboatError
from core.validators import single_line
from vault import services
from vault.choices import MAX_RETENTION_HOURS
from vault.models import NetworkPurpose, RecoverySite, RecoverySiteKind, ReplicationPolicy, Vault, VaultRole, VCenter
from vault.simulation import PATTERNS


class ServiceForm(forms.Form):
    """A form whose save() calls a service; domain errors become form errors."""

    def save_with(self, fn, **kwargs):
        try:
            return fn(**kwargs)
        except ValidationError as exc:
            if hasattr(exc, "error_dict"):
                for field, errors in exc.message_dict.items():
                    self.add_error(field if field in self.fields else None, errors)
            else:
                self.add_error(None, exc.messages)
        except LifeboatError as exc:
            self.add_error(None, exc.message)
        return None


class EmailListField(forms.CharField):
    def to_python(self, value):
        text = super().to_python(value) or ""
        emails = [e.strip() for e in text.replace(";", ",").replace("\n", ",").split(",") if e.strip()]
        for email in emails:
            try:
                validate_email(email)
            except ValidationError:
                raise ValidationError(f"'{email}' is not a valid e-mail address.") from None
        return emails


class VaultForm(ServiceForm):
    name = forms.CharField(max_length=80, validators=[single_line])
    passphrase = forms.CharField(
        widget=forms.PasswordInput, min_length=services.MIN_PASSPHRASE_LENGTH, required=False,
        help_text=f"At least {services.MIN_PASSPHRASE_LENGTH} characters; agents use it to register. Leave empty to keep the current one.",
    )
    description = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False)
    off_hours_start = forms.TimeField(initial="22:00", widget=forms.TimeInput(attrs={"type": "time"}))
    off_hours_end = forms.TimeField(initial="06:00", widget=forms.TimeInput(attrs={"type": "time"}))
    off_hours_time_zone = forms.CharField(initial="UTC", max_length=64)
    alert_emails = EmailListField(required=False, help_text="Comma-separated addresses.")
    email_alerts_enabled = forms.BooleanField(required=False, initial=True)

    def __init__(self, *args, instance: Vault | None = None, **kwargs):
        self.instance = instance
        if instance is not None and "initial" not in kwargs:
            kwargs["initial"] = {
                "name": instance.name, "description": instance.description,
                "off_hours_start": instance.off_hours_start, "off_hours_end": instance.off_hours_end,
                "off_hours_time_zone": instance.off_hours_time_zone, "alert_emails": ", ".join(instance.alert_emails),
                "email_alerts_enabled": instance.email_alerts_enabled,
            }
        super().__init__(*args, **kwargs)
        if instance is None:
            self.fields["passphrase"].required = True
            self.fields["passphrase"].help_text = f"At least {services.MIN_PASSPHRASE_LENGTH} characters; agents use it to register."

    def save(self) -> Vault | None:
        data = dict(self.cleaned_data)
        passphrase = data.pop("passphrase") or None
        if self.instance is None:
            return self.save_with(services.vault_create, passphrase=passphrase, **data)
        return self.save_with(services.vault_update, vault=self.instance, passphrase=passphrase, **data)


class PolicyForm(forms.ModelForm):
    class Meta:
        model = ReplicationPolicy
        fields = [
            "name", "storage_tier", "rpo_threshold_minutes", "recovery_point_retention_hours",
            "app_consistent_frequency_hours", "crash_consistent_frequency_seconds",
        ]

    def __init__(self, *args, vault: Vault, **kwargs):
        super().__init__(*args, **kwargs)
        self.vault = vault
        self.instance.vault = vault

    def clean(self):
        data = super().clean()
        tier, retention = data.get("storage_tier"), data.get("recovery_point_retention_hours")
        if tier and retention is not None and retention > MAX_RETENTION_HOURS[tier]:
            self.add_error(
                "recovery_point_retention_hours",
                f"{tier.capitalize()} storage keeps recovery points for at most {MAX_RETENTION_HOURS[tier]} hours.",
            )
        return data

    def save(self, commit=True):
        data = {f: self.cleaned_data[f] for f in self.Meta.fields}
        try:
            if self.instance.pk:
                return services.policy_update(policy=self.instance, **data)
            name = data.pop("name")
            return services.policy_create(vault=self.vault, name=name, **data)
        except LifeboatError as exc:
            self.add_error(None, exc.message)
        except ValidationError as exc:
            self.add_error(None, exc.messages)
        return None


class VCenterForm(ServiceForm):
    name = forms.CharField(max_length=120, validators=[single_line])
    kind = forms.ChoiceField(choices=VCenter._meta.get_field("kind").choices, initial="vcenter")
    host = forms.CharField(max_length=255, help_text="Host name or IP address (for the simulated site: its data directory).")
    port = forms.IntegerField(min_value=1, max_value=65535, initial=443)
    username = forms.CharField(max_length=255)
    password = forms.CharField(widget=forms.PasswordInput, max_length=512)
    allow_untrusted = forms.BooleanField(required=False, help_text="Accept a self-signed certificate.")
    thumbprint = forms.CharField(required=False, max_length=128, help_text="Or pin the certificate's thumbprint.")

    def save(self, *, vault: Vault):
        return self.save_with(services.vcenter_create, vault=vault, **self.cleaned_data)


class NameListField(forms.CharField):
    """Names separated by commas or new lines."""

    def to_python(self, value):
        text = super().to_python(value) or ""
        names = [n.strip() for n in text.replace("\n", ",").split(",") if n.strip()]
        return list(dict.fromkeys(names))


class RecoverySiteForm(ServiceForm):
    """Add a recovery site with its networks (at least one recovery and one test network)."""

    name = forms.CharField(max_length=120, validators=[single_line])
    kind = forms.ChoiceField(choices=RecoverySiteKind.choices, initial=RecoverySiteKind.SIMULATED)
    host = forms.CharField(
        max_length=1000, label="Host or data directory",
        help_text="vSphere: the vCenter or ESXi host name or address. Simulated: an absolute path for its data directory.",
    )
    port = forms.IntegerField(min_value=1, max_value=65535, initial=443, help_text="vSphere only.")
    username = forms.CharField(max_length=255, required=False, help_text="vSphere only.")
    password = forms.CharField(widget=forms.PasswordInput, max_length=512, required=False, help_text="vSphere only.")
    allow_untrusted = forms.BooleanField(required=False, help_text="vSphere: accept a self-signed certificate.")
    thumbprint = forms.CharField(required=False, max_length=128, help_text="vSphere: or pin the certificate's thumbprint.")
    datacenter = forms.CharField(required=False, max_length=255, help_text="vSphere: the datacenter recovered VMs are created in.")
    datastore = forms.CharField(required=False, max_length=255, help_text="vSphere: the datastore recovered disks are uploaded to.")
    placement = forms.CharField(required=False, max_length=255, label="Host or cluster",
                                help_text="vSphere: the host or cluster recovered VMs run on.")
    recovery_networks = NameListField(
        label="Recovery networks", initial="recovery-net",
        help_text="Comma-separated. Failed-over VMs are attached here (vSphere: port group names).",
    )
    test_networks = NameListField(
        label="Test networks", initial="test-net",
        help_text="Comma-separated. Isolated networks for test failover (vSphere: port group names).",
    )

    def save(self, *, vault: Vault) -> RecoverySite | None:
        data = dict(self.cleaned_data)
        networks = [{"name": name, "purpose": NetworkPurpose.RECOVERY} for name in data.pop("recovery_networks")]
        networks += [{"name": name, "purpose": NetworkPurpose.TEST} for name in data.pop("test_networks")]
        return self.save_with(services.recovery_site_create, vault=vault, networks=networks, **data)


class WorkloadForm(forms.Form):
    rate_bytes_per_s = forms.IntegerField(min_value=0, max_value=2 * 1024**3, label="Write rate (bytes/s)")
    write_size = forms.IntegerField(min_value=512, max_value=8 * 1024 * 1024, initial=65536, label="Write size (bytes)")
    pattern = forms.ChoiceField(choices=[(p, p) for p in PATTERNS])

    def clean_write_size(self):
        value = self.cleaned_data["write_size"]
        if value % 512:
            raise forms.ValidationError("Writes are whole 512-byte sectors.")
        return value


class RoleAssignmentForm(ServiceForm):
    kind = forms.ChoiceField(choices=[("user", "User"), ("group", "Group")], initial="user", label="Give")
    who = forms.CharField(max_length=150, label="User or group")
    role = forms.ChoiceField(choices=VaultRole.choices, initial=VaultRole.READER)
