"""The portal's recovery forms: test failover, cleanup, failover, change recovery point, commit;
and the recovery plan editor's.

Each form knows its item, offers only what the item has (its recovery points, its recovery
site's networks) and, in ``submit()``, calls the recovery service; a domain error (another
operation running, no point of that kind) becomes a form error, so nothing half-done reaches
the user as a traceback.
"""
from __future__ import annotations

from django import forms

from core.exceptions import Conflict, LifeboatError
from recovery_plans import services
from recovery_plans.models import (
    SCRIPT_TIMEOUT_DEFAULT_SECONDS,
    SCRIPT_TIMEOUT_MAX_SECONDS,
    SCRIPT_TIMEOUT_MIN_SECONDS,
    ActionKind,
    ActionPhase,
    PlanRecoveryPoint,
    RecoveryPlanAction,
)
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


# --- the plan editor ------------------------------------------------------------------------
# One small form per edit; each names what it edits (group, item, action) by id, checks the id
# belongs to the plan, and calls one plan service in ``submit()``. A refused edit becomes a
# form error with the service's sentence; a name already taken is a conflict (409).


class PlanEditForm(ServiceForm):
    conflict = False

    def __init__(self, *args, plan=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan

    def _group_field(self, label="Group") -> forms.ModelChoiceField:
        return forms.ModelChoiceField(queryset=self.plan.groups.order_by("order"), label=label, empty_label=None)

    def _call(self, fn, **kwargs):
        try:
            return fn(**kwargs) or True
        except Conflict as exc:
            self.conflict = True
            self.add_error(None, exc.message)
        except LifeboatError as exc:  # a whole sentence already: not tied to a field's label
            self.add_error(None, exc.message)
        return None

    def error_text(self) -> str:
        """Every error of the form in one line, for a message above the editor."""
        texts = []
        for field, errors in self.errors.items():
            label = self.fields[field].label if field in self.fields else None
            texts += [f"{label}: {e}" if label and not e.startswith(str(label)) else e for e in errors]
        return " ".join(texts)


class PlanSettingsForm(PlanEditForm):
    name = forms.CharField(max_length=120)
    description = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False)
    recovery_point_type = forms.ChoiceField(
        choices=PlanRecoveryPoint.choices, label="Default recovery point",
        help_text="The point each item fails over to when the plan runs.",
    )

    def __init__(self, *args, plan=None, **kwargs):
        if plan is not None and "initial" not in kwargs:
            kwargs["initial"] = {"name": plan.name, "description": plan.description,
                                 "recovery_point_type": plan.recovery_point_type}
        super().__init__(*args, plan=plan, **kwargs)

    def submit(self, *, user):
        return self._call(services.recovery_plan_update, plan=self.plan, **self.cleaned_data)


class PlanCreateForm(PlanSettingsForm):
    group_name = forms.CharField(max_length=120, required=False, initial="Group 1", label="First group")
    items = forms.ModelMultipleChoiceField(
        queryset=ProtectedItem.objects.none(), widget=forms.CheckboxSelectMultiple, required=False,
        label="Protected items of the first group", help_text="A plan needs at least one; add more groups next.",
    )

    def __init__(self, *args, vault, **kwargs):
        super().__init__(*args, **kwargs)
        self.vault = vault
        self.fields["items"].queryset = vault.protected_items.order_by("name")
        self.fields["recovery_point_type"].initial = PlanRecoveryPoint.LATEST

    def submit(self, *, user):
        data = self.cleaned_data
        return self._call(
            services.recovery_plan_create, vault=self.vault, name=data["name"], description=data["description"],
            recovery_point_type=data["recovery_point_type"], user=user,
            groups=[{"name": data["group_name"], "items": list(data["items"])}],
        )


class PlanNetworkMappingForm(PlanEditForm):
    """Per recovery site of the plan's items: its recovery and test network for this plan."""

    def __init__(self, *args, plan=None, sites=(), **kwargs):
        super().__init__(*args, plan=plan, **kwargs)
        current = {m.site_id: m for m in plan.network_mappings.all()}
        self.sites = list(sites)
        for site in self.sites:
            mapping = current.get(site.pk)
            for purpose, field, label in (("RECOVERY", "recovery_network", "recovery network"),
                                          ("TEST", "test_network", "test network")):
                self.fields[f"{field}_{site.pk}"] = forms.ModelChoiceField(
                    queryset=site.networks.filter(purpose=purpose).order_by("name"), required=False,
                    label=f"{site.name}: {label}", empty_label="Each item's own mapping",
                    initial=getattr(mapping, f"{field}_id", None),
                )

    def submit(self, *, user):
        mappings = []
        for site in self.sites:
            recovery = self.cleaned_data.get(f"recovery_network_{site.pk}")
            test = self.cleaned_data.get(f"test_network_{site.pk}")
            if recovery or test:
                mappings.append({"site": site, "recovery_network": recovery, "test_network": test})
        return self._call(services.recovery_plan_update, plan=self.plan, network_mappings=mappings)


class GroupAddForm(PlanEditForm):
    name = forms.CharField(max_length=120, required=False, label="New group's name")

    def submit(self, *, user):
        return self._call(services.recovery_plan_group_add, plan=self.plan, name=self.cleaned_data["name"])


class GroupRenameForm(PlanEditForm):
    name = forms.CharField(max_length=120, required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["group"] = self._group_field()

    def submit(self, *, user):
        return self._call(services.recovery_plan_group_rename, group=self.cleaned_data["group"],
                          name=self.cleaned_data["name"])


class GroupMoveForm(PlanEditForm):
    position = forms.IntegerField(min_value=1, help_text="1 fails over first.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["group"] = self._group_field()

    def submit(self, *, user):
        return self._call(services.recovery_plan_group_move, group=self.cleaned_data["group"],
                          position=self.cleaned_data["position"])


class GroupRemoveForm(PlanEditForm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["group"] = self._group_field()

    def submit(self, *, user):
        return self._call(services.recovery_plan_group_remove, group=self.cleaned_data["group"])


class ItemsAddForm(PlanEditForm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["group"] = self._group_field()
        # Any item id is accepted here, so that one of another vault gets the service's sentence.
        self.fields["items"] = forms.ModelMultipleChoiceField(
            queryset=ProtectedItem.objects.all(), widget=forms.CheckboxSelectMultiple, label="Protected items",
            error_messages={"required": "Choose at least one protected item to add."},
        )

    def submit(self, *, user):
        return self._call(services.recovery_plan_items_add, group=self.cleaned_data["group"],
                          items=list(self.cleaned_data["items"]))


class ItemMoveForm(PlanEditForm):
    item = forms.ModelChoiceField(queryset=ProtectedItem.objects.all())

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["group"] = self._group_field("Move to")

    def submit(self, *, user):
        return self._call(services.recovery_plan_item_move, plan=self.plan, item=self.cleaned_data["item"],
                          group=self.cleaned_data["group"])


class ItemRemoveForm(PlanEditForm):
    item = forms.ModelChoiceField(queryset=ProtectedItem.objects.all())

    def submit(self, *, user):
        return self._call(services.recovery_plan_item_remove, plan=self.plan, item=self.cleaned_data["item"])


class ActionAddForm(PlanEditForm):
    phase = forms.ChoiceField(choices=ActionPhase.choices, label="When")
    kind = forms.ChoiceField(choices=ActionKind.choices, label="Kind")
    name = forms.CharField(max_length=120)
    script = forms.CharField(required=False, label="Command", help_text="For a script: the command the worker runs.",
                             widget=forms.TextInput(attrs={"placeholder": "/opt/dr/update-dns.sh"}))
    timeout_seconds = forms.IntegerField(
        required=False, initial=SCRIPT_TIMEOUT_DEFAULT_SECONDS, label="Timeout (s)",
        help_text=f"For a script: {SCRIPT_TIMEOUT_MIN_SECONDS}-{SCRIPT_TIMEOUT_MAX_SECONDS} seconds.",
    )
    instructions = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}),
                                   help_text="For a manual action: what the admin must do before resuming the plan.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["group"] = self._group_field()

    def submit(self, *, user):
        data = dict(self.cleaned_data)
        if data["timeout_seconds"] is None:
            data["timeout_seconds"] = SCRIPT_TIMEOUT_DEFAULT_SECONDS
        return self._call(services.recovery_plan_action_add, **data)


class ActionRemoveForm(PlanEditForm):
    action = forms.ModelChoiceField(queryset=RecoveryPlanAction.objects.none())

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["action"].queryset = RecoveryPlanAction.objects.filter(group__plan=self.plan)

    def submit(self, *, user):
        return self._call(services.recovery_plan_action_remove, action=self.cleaned_data["action"])


# operation (in the URL) -> form
PLAN_EDITS = {
    "settings": PlanSettingsForm,
    "network-mapping": PlanNetworkMappingForm,
    "add-group": GroupAddForm,
    "rename-group": GroupRenameForm,
    "move-group": GroupMoveForm,
    "remove-group": GroupRemoveForm,
    "add-items": ItemsAddForm,
    "move-item": ItemMoveForm,
    "remove-item": ItemRemoveForm,
    "add-action": ActionAddForm,
    "remove-action": ActionRemoveForm,
}
