"""Continuous batching: which tokens of which requests run in the next step.

Every step, running requests go first (a decode token each, or the next piece of a prefill),
then waiting requests are admitted while the token budget, the sequence cap and the KV blocks
allow. When blocks run out, the newest running request is preempted: its blocks are freed and
it goes back to the front of the queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque

from herd.engine.kv_cache import KVBlockManager
from herd.engine.request import Request, Status
from herd.engine.runner import ScheduledSeq


class Scheduler:
    def __init__(self, blocks: KVBlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _try_allocate(self, r: Request, num_new: int) -> bool:
        total = r.num_computed + num_new
        if not self.blocks.can_allocate(r.block_tables, total, r.num_computed):
            return False
        self.blocks.allocate(r.block_tables, total, r.num_computed)
        return True

    def _preempt(self, r: Request) -> None:
        self.blocks.free(r.block_tables)
        r.num_computed = 0
        r.status = Status.WAITING
        self.running.remove(r)
        self.waiting.appendleft(r)
        self.num_preemptions += 1

    def step(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        scheduled: set[str] = set()
        preemptions_before = self.num_preemptions
        for r in list(self.running):
            if budget == 0:
                break
            if r not in self.running:
                continue  # preempted earlier in this loop
            num_new = min(r.num_tokens - r.num_computed, budget)
            allocated = self._try_allocate(r, num_new)
            while not allocated:
                # Out of blocks: the newest request not yet scheduled in this step gives way
                # (possibly r itself).
                victim = next(v for v in reversed(self.running) if v.request_id not in scheduled)
                self._preempt(victim)
                if victim is r:
                    break
                allocated = self._try_allocate(r, num_new)
            if not allocated:
                continue
            batch.append(ScheduledSeq(r, num_new))
            scheduled.add(r.request_id)
            budget -= num_new

        # After a preemption, blocks are scarce: admitting new work would only thrash.
        admit = self.num_preemptions == preemptions_before
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            num_new = min(r.num_tokens - r.num_computed, budget)
            if not self._try_allocate(r, num_new):
                break
            self.waiting.popleft()
            r.status = Status.RUNNING
            self.running.append(r)
            batch.append(ScheduledSeq(r, num_new))
            scheduled.add(r.request_id)
            budget -= num_new
        return batch

    def finish(self, r: Request) -> None:
        self.blocks.free(r.block_tables)
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
