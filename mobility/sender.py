"""Batches in the making, and the sender that ships them to the item's process server."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from mobility import wire
from mobility.assignment import ItemAssignment
from mobility.transport import BatchAnswer, DigestAnswer, ProcessServerClient, RetryPolicy, TransportError


@dataclass
class Built:
    """A batch ready to send: its bytes (as pieces), its plan and what its ack changes."""

    seq: int
    plan: dict
    encoded: wire.EncodedBatch
    block_digests: list[tuple[int, int, bytes]] = field(default_factory=list)  # (disk, block, digest)
    journal_blocks: list[tuple[int, int]] = field(default_factory=list)  # (disk, block) touched
    copy_bytes: int = 0
    sent_data: int = 0  # bytes of disk data the batch carries (a resync's "bytes sent")
    rebuilt: bool = False  # made again from a saved plan (already in the state's inflight list)
    buffer: bytearray | None = None  # pooled read buffer the records point into


BARRIER = object()  # yielded among batches: wait for every batch in flight to be answered


class Sender:
    """Up to ``window`` batches of one item in flight, each on its own pinned connection."""

    def __init__(self, item: ItemAssignment, *, window: int, retry: RetryPolicy, timeout: float) -> None:
        self.item = item
        self.retry = retry
        self.timeout = timeout
        self._local = threading.local()
        self._clients: list[ProcessServerClient] = []
        self._pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix=f"send-{str(item.item_id)[:8]}")
        self._lock = threading.Lock()

    def _client(self) -> ProcessServerClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = ProcessServerClient(self.item.process_server_url,
                                         thumbprint=self.item.process_server_thumbprint, timeout=self.timeout)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def submit(self, built: Built, *, acked_floor: int, after: Future | None = None) -> Future:
        return self._pool.submit(self._send, built, acked_floor, after)

    def _send(self, built: Built, acked_floor: int, after: Future | None = None) -> BatchAnswer:
        if after is not None:
            after.result()  # the batch's plan is durable: only now may it leave
        def once() -> BatchAnswer:
            answer = self._client().send_batch(item_id=self.item.item_id, token=self.item.item_token,
                                               seq=built.seq, parts=built.encoded.parts, size=built.encoded.size)
            if answer.outcome == "gap" and answer.acked_seq >= acked_floor:
                # a predecessor of this batch is still on its way (or is being retried)
                raise TransportError(answer.message, transient=True, body={"acked_seq": answer.acked_seq})
            return answer

        return self.retry.run(once)

    def acked_seq(self) -> int:
        return self.retry.run(lambda: self._client().item_state(item_id=self.item.item_id,
                                                                token=self.item.item_token))

    def replica_digests(self, *, disk: int, min_seq: int, groups: str | None = None) -> DigestAnswer:
        return self.retry.run(lambda: self._client().replica_digests(
            item_id=self.item.item_id, token=self.item.item_token, disk=disk, min_seq=min_seq, groups=groups))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()
