"""The configuration server tells an agent when an item's replica already holds a copy of
its disks (``seeded``), so that an agent with no state for it compares instead of copying."""
from __future__ import annotations

import pytest

from mobility.assignment import ItemAssignment
from replication.agents import agent_assignment, agent_push
from replication.choices import ProtectionState as P
from replication.models import ProtectedItem
from tests.factories import ProcessServerFactory, ProtectedItemFactory, ReplicaDiskFactory


@pytest.mark.parametrize("state,progress,seeded", [
    (P.RESYNCING, 100, True),  # a complete replica to compare with
    (P.RESYNCING, 40, False),  # the initial copy never completed: it starts over
    (P.PROTECTED, 100, False),  # nothing asked for
    (P.INITIAL_REPLICATION, 0, False),
    (P.RESYNC_REQUIRED, 100, False),  # not asked for yet
])
def test_the_assignment_says_seeded_for_a_resync_of_a_complete_replica(db, state, progress, seeded):
    item = ProtectedItemFactory(process_server=ProcessServerFactory(thumbprint="ab" * 32))
    ReplicaDiskFactory(item=item, source_path="/dev/sda")
    ProtectedItem.objects.filter(pk=item.pk).update(protection_state=state, initial_replication_progress=progress)
    [raw] = agent_assignment(agent=agent_push(machine=item.machine))["items"]
    assert raw["seeded"] is seeded and raw["resync"] is (state == P.RESYNCING)
    assert ItemAssignment.from_dict(raw).seeded is seeded
