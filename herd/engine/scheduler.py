"""Continuous batching: which tokens of which requests run in the next step.

Every step, running requests go first (a decode token each, or the next piece of a prefill),
then waiting requests are admitted while the token budget, the sequence cap and the KV blocks
allow; an admitted request starts after the longest prefix found in the prefix cache. When
blocks run out, the newest running request is preempted: its blocks are freed and it goes back
to the front of the queue, to be recomputed later (its cached blocks often survive).

Requests carry a priority (SamplingParams.priority, lower first, as vLLM's priority policy):
the queue is kept in priority order (first come, first served within a priority), running
requests of a better priority take the step's token budget first, the worst-priority newest
request is the one preempted, and a waiting request may preempt running work of a worse
priority to get in. Batch-API lines run at a worse priority than interactive requests.
"""

from __future__ import annotations

from collections import deque

from herd.engine.kv_cache import KVBlockManager, chain_hashes
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
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which were found there
        self.num_computed_tokens = 0  # tokens run through the model, all steps together

    def add(self, request: Request) -> None:
        # After every request of the same or a better priority (FCFS within a priority).
        p = request.params.priority
        if not self.waiting or self.waiting[-1].params.priority <= p:
            self.waiting.append(request)
            return
        i = next(i for i, w in enumerate(self.waiting) if w.params.priority > p)
        self.waiting.insert(i, request)

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
        # Back to the front of its own priority class: it was admitted before anything waiting there.
        p = r.params.priority
        i = next((i for i, w in enumerate(self.waiting) if w.params.priority >= p), len(self.waiting))
        self.waiting.insert(i, r)
        self.num_preemptions += 1

    def _victim(self, scheduled: set[str], worse_than: int | None = None) -> Request | None:
        """The running request to preempt: the newest of the worst priority not scheduled in
        this step; with `worse_than`, only one of a strictly worse priority than that."""
        best = None
        for v in reversed(self.running):
            if v.request_id in scheduled:
                continue
            if best is None or v.params.priority > best.params.priority:
                best = v
        if best is not None and worse_than is not None and best.params.priority <= worse_than:
            return None
        return best

    def _ready(self, r: Request) -> bool:
        if r.grammar is not None and not r.grammar.ready:
            return False  # its grammar is still compiling; the others go ahead
        parent = r.wait_for
        return parent is None or parent.finished or parent.num_computed >= len(parent.prompt_ids)

    def _admit(self, r: Request, budget: int) -> int:
        """Allocates what r needs to start; returns the tokens it will compute (0: not now)."""
        cached = 0
        if r.uses_prefix_cache:
            bs = self.blocks.block_size
            r.block_hashes = chain_hashes(r.all_ids, bs, r.block_hashes, r.block_extra(bs))
            cached = self.blocks.cached_prefix(r.all_ids, r.block_hashes, r.block_tables)
        r.num_computed = cached
        num_new = min(r.num_tokens - cached, budget)
        if not self._try_allocate(r, num_new):
            self.blocks.free(r.block_tables)
            r.num_computed = 0
            return 0
        if not r.admitted_once:
            r.admitted_once = True
            r.num_cached_tokens = cached
            self.prefix_queries += len(r.prompt_ids)
            self.prefix_hits += cached
        r.num_registered_blocks = cached // self.blocks.block_size
        return num_new

    def _yield_to_better_priority(self) -> None:
        """When the head of the queue cannot get in (no sequence slot, or not the blocks for its
        first chunk), running work of a worse priority gives way, newest first."""
        if not self.waiting or not self._ready(self.waiting[0]):
            return
        head = self.waiting[0]
        first_chunk = min(head.num_tokens, self.max_num_batched_tokens)
        while len(self.running) >= self.max_num_seqs or not self.blocks.can_allocate(
            head.block_tables, first_chunk, head.num_computed
        ):
            victim = self._victim(set(), worse_than=head.params.priority)
            if victim is None:
                return
            self._preempt(victim)

    def step(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        scheduled: set[str] = set()
        self._yield_to_better_priority()
        preemptions_before = self.num_preemptions
        # Better priorities first (sorted is stable: admission order within a priority).
        for r in sorted(self.running, key=lambda r: r.params.priority):
            if budget == 0:
                break
            if r not in self.running:
                continue  # preempted earlier in this loop
            num_new = min(r.num_tokens - r.num_computed, budget)
            allocated = self._try_allocate(r, num_new)
            while not allocated:
                # Out of blocks: the newest request of the worst priority not yet scheduled in
                # this step gives way (possibly r itself).
                victim = self._victim(scheduled)
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
        if self.num_preemptions != preemptions_before:
            return batch
        for r in list(self.waiting):
            if budget == 0:
                break
            if not self._ready(r):
                continue  # its sibling is still computing the shared prompt, or its grammar compiling
            if len(self.running) >= self.max_num_seqs:
                break
            num_new = self._admit(r, budget)
            if num_new == 0:
                break  # first come, first served: nothing behind it jumps the queue
            self.waiting.remove(r)
            r.status = Status.RUNNING
            self.running.append(r)
            batch.append(ScheduledSeq(r, num_new))
            scheduled.add(r.request_id)
            budget -= num_new
        return batch

    def after_step(self, batch: list[ScheduledSeq]) -> None:
        """Records computed tokens and names newly filled blocks for the prefix cache."""
        bs = self.blocks.block_size
        for item in batch:
            r = item.request
            r.num_computed += item.num_new
            self.num_computed_tokens += item.num_new
            full = r.num_computed // bs
            if full > r.num_registered_blocks:
                r.block_hashes = chain_hashes(r.all_ids[: full * bs], bs, r.block_hashes[:full], r.block_extra(bs))
                self.blocks.register_full_blocks(r.block_tables, r.block_hashes, r.num_registered_blocks)
                r.num_registered_blocks = full

    def finish(self, r: Request) -> None:
        self.blocks.free(r.block_tables)
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
