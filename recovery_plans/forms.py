"""The portal's recovery forms: test failover, cleanup, failover, change recovery point, commit.

Each form knows its item, offers only what the item has (its recovery points, its recovery
site's networks) and, in ``submit()``, calls the recovery service; a domain error (another
operation running, no point of that kind) becomes a form error, so nothing half-done reaches
the user as a traceback.
"""
from __future__ import annotations

from django import forms

from core.exceptions import Conflict, LifeboatError
from recovery_plans import services
from replication.models import ProtectedItem
from vault.forms import ServiceForm
from vault.models import RecoveryNetwork

NEWEST_POINTS = [
    ("latest", "Latest: the newest recovery point"),
    ("latest_processed", "Latest processed: the newest recovery point (every point is processed when it is cut)"),
    ("latest_app_consistent", "Latest app-consistent: the newest point taken while the VM was quiesced"),
]
POINTS_SHOWN = 50


def point_choices(item: ProtectedItem) -> list:
    """Grouped choices: the three "newest" kinds, then the item's points with type and time."""
    points = [
        (str(p.pk), f"{p.time:%Y-%m-%d %H:%M:%S %Z} · {p.get_type_display()}{f' · {p.label}' if p.label else ''}")
        for p in item.recovery_points.order_by("-time")[:POINTS_SHOWN]
    ]
    choices: list = [("Newest", NEWEST_POINTS)]
    if points:
        choices.append(("A specific recovery point (newest first)", points))
    return choices


class RecoveryForm(ServiceForm):
    """A recovery operation on one item; ``submit()`` returns the job, or None with errors."""

    conflict = False  # set when the item's state did not allow the operation (the API's 409)

    def __init__(self, *args, item: ProtectedItem, **kwargs):
        super().__init__(*args, **kwargs)
        self.item = item

    def _point(self) -> dict:
        value = self.cleaned_data["point"]
        if value in services.POINT_CHOICES:
            return {"point": value}
        return {"point": "custom", "recovery_point_id": value}

    def _network_field(self, purpose: str, mapped, *, label: str, help_text: str) -> forms.ModelChoiceField:
        """The recovery site's networks of ``purpose``, the item's mapping chosen. Without a
        recovery site the field is empty and optional, so the service says what is missing."""
        site = self.item.recovery_site
        return forms.ModelChoiceField(
            queryset=site.networks.filter(purpose=purpose).order_by("name") if site else RecoveryNetwork.objects.none(),
            initial=mapped.pk if mapped is not None else None, label=label, help_text=help_text,
            empty_label=None, required=site is not None,
        )

    def _confirm_name_field(self, verb: str) -> forms.CharField:
        return forms.CharField(
            label=f"Type the VM's name, {self.item.name}, to {verb}", max_length=255,
            widget=forms.TextInput(attrs={"autocomplete": "off"}),
        )

    def clean_confirm_name(self):
        value = self.cleaned_data["confirm_name"].strip()
        if value != self.item.name:
            raise forms.ValidationError(f"That is not the VM's name. Type {self.item.name} exactly.")
        return value

    def _call(self, fn, **kwargs):
        try:
            _, job = fn(item=self.item, **kwargs)
            return job
        except Conflict as exc:  # another operation got there first, or the state moved on
            self.conflict = True
            self.add_error(None, exc.message)
        except LifeboatError as exc:
            fields = [f for f in (exc.extra or {}).get("fields", {}) if f in self.fields]
            self.add_error(fields[0] if fields else None, exc.message)
        return None


class TestFailoverForm(RecoveryForm):
    point = forms.ChoiceField(label="Recovery point")

    def __init__(self, *args, item: ProtectedItem, **kwargs):
        super().__init__(*args, item=item, **kwargs)
        self.fields["point"].choices = point_choices(item)
        self.fields["point"].initial = "latest_processed"
        self.fields["network"] = self._network_field(
            "TEST", item.test_network, label="Test network",
            help_text="An isolated network: the test VM must not reach production.",
        )
        self.fields["confirm"] = forms.BooleanField(
            label=f"Start a test failover of {item.name}; replication goes on untouched",
        )

    def submit(self, *, user):
        return self._call(services.protected_item_test_failover, network=self.cleaned_data["network"],
                          user=user, **self._point())


class TestFailoverCleanupForm(RecoveryForm):
    notes = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}), required=False, max_length=4000, label="Notes",
        help_text="What the drill showed; kept with the drill's record.",
    )

    def __init__(self, *args, item: ProtectedItem, **kwargs):
        super().__init__(*args, item=item, **kwargs)
        self.fields["confirm"] = forms.BooleanField(label=f"Delete the test VM of {item.name} and its disks")

    def submit(self, *, user):
        return self._call(services.protected_item_test_failover_cleanup, notes=self.cleaned_data["notes"], user=user)


class FailoverForm(RecoveryForm):
    kind = forms.ChoiceField(
        label="Failover", widget=forms.RadioSelect, initial="planned",
        choices=[
            ("planned", "Planned: shut the source VM down, replicate its last writes, recover with no data loss"),
            ("unplanned", "Unplanned: the source is gone; recover from the recovery point chosen below"),
        ],
    )
    point = forms.ChoiceField(label="Recovery point (unplanned failover)",
                              help_text="A planned failover always recovers to a point taken after the source's last write.")
    shut_down_source = forms.BooleanField(
        required=False, initial=True, label="Shut down the source VM if it can be reached (unplanned failover)",
    )

    def __init__(self, *args, item: ProtectedItem, **kwargs):
        super().__init__(*args, item=item, **kwargs)
        self.fields["point"].choices = point_choices(item)
        self.fields["point"].initial = "latest"
        self.fields["network"] = self._network_field(
            "RECOVERY", item.recovery_network, label="Recovery network",
            help_text="Where the recovered VM runs; the item's network mapping is the default.",
        )
        self.fields["confirm_name"] = self._confirm_name_field("fail it over")

    def submit(self, *, user):
        network = self.cleaned_data["network"]
        if self.cleaned_data["kind"] == "planned":
            return self._call(services.protected_item_planned_failover, network=network, user=user)
        return self._call(services.protected_item_unplanned_failover, network=network, user=user,
                          shut_down_source=self.cleaned_data["shut_down_source"], **self._point())


class ApplyRecoveryPointForm(RecoveryForm):
    point = forms.ChoiceField(label="Recovery point")

    def __init__(self, *args, item: ProtectedItem, **kwargs):
        super().__init__(*args, item=item, **kwargs)
        self.fields["point"].choices = point_choices(item)
        self.fields["confirm"] = forms.BooleanField(
            label=f"Power off the failed-over VM of {item.name} and replace its disks with this point's",
        )

    def submit(self, *, user):
        return self._call(services.protected_item_apply_recovery_point, user=user, **self._point())


class FailoverCommitForm(RecoveryForm):
    def __init__(self, *args, item: ProtectedItem, **kwargs):
        super().__init__(*args, item=item, **kwargs)
        self.fields["confirm_name"] = self._confirm_name_field("commit its failover")

    def submit(self, *, user):
        return self._call(services.protected_item_failover_commit, user=user)
