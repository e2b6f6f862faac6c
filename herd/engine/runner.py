"""Runs one scheduled step: flat tensors in, model forward, logits, sampled tokens out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.engine.kv_cache import KVCache
from herd.engine.request import Request
from herd.engine.sampling import SampleRow, Sampled, sample
from herd.model.attention import AttentionMetadata, GroupTables, SeqSlice
from herd.model.llama4 import Llama4TextModel


PROMPT_LOGPROBS_CHUNK = 256


@dataclass
class ScheduledSeq:
    request: Request
    num_new: int  # tokens of this request computed in this step


class Runner:
    def __init__(self, model: Llama4TextModel, cache: KVCache, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device

    def _metadata(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, AttentionMetadata]:
        bs = self.cache.block_size
        ids, positions, seqs = [], [], []
        slots: dict[str, list[int]] = {g: [] for g in self.cache.group_names}
        tables: dict[str, list[torch.Tensor]] = {g: [] for g in self.cache.group_names}
        row = 0
        for item in batch:
            r = item.request
            start, end = r.num_computed, r.num_computed + item.num_new
            ids.extend(r.all_ids[start:end])
            positions.extend(range(start, end))
            seqs.append(SeqSlice(row, row + item.num_new, end))
            row += item.num_new
            for g in slots:
                table = r.block_tables[g]
                slots[g].extend(table[p // bs] * bs + p % bs for p in range(start, end))
                tables[g].append(torch.tensor(table, dtype=torch.long, device=self.device))
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            seqs=seqs,
            groups={
                g: GroupTables(torch.tensor(slots[g], dtype=torch.long, device=self.device), tables[g])
                for g in slots
            },
            block_size=bs,
        )
        return torch.tensor(ids, dtype=torch.long, device=self.device), meta

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> list[Sampled | None]:
        """Computes the step; returns a sampled token for each sequence that reached its end.

        Prompt logprobs, for requests that ask, are stored on the request as a side effect.
        """
        input_ids, meta = self._metadata(batch)
        hidden = self.model(input_ids, meta, self.cache.layers)
        sample_rows, rows = [], []
        for item, seq in zip(batch, meta.seqs):
            r = item.request
            if r.params.prompt_logprobs is not None:
                self._prompt_logprobs(r, hidden[seq.start : seq.end], r.num_computed)
            if r.num_computed + item.num_new == r.num_tokens:
                sample_rows.append(seq.end - 1)
                rows.append(SampleRow(r.params, r.prompt_ids, r.output_ids, self._blocked(r)))
        results: list[Sampled | None] = [None] * len(batch)
        if rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
            sampled = iter(sample(logits, rows))
            for i, item in enumerate(batch):
                r = item.request
                if r.num_computed + item.num_new == r.num_tokens:
                    results[i] = next(sampled)
        return results

    def _prompt_logprobs(self, r: Request, hidden: torch.Tensor, first_pos: int) -> None:
        """Logprob of each prompt token given the ones before it (position 0 has none)."""
        if r.prompt_logprobs is None:
            r.prompt_logprobs = [None]
        prompt = r.prompt_ids
        k = r.params.prompt_logprobs
        # Rows whose next token is a prompt token not yet scored (a recompute after preemption
        # scores nothing twice).
        lo = max(first_pos, len(r.prompt_logprobs) - 1)
        hi = min(first_pos + hidden.shape[0], len(prompt) - 1)
        # Chunks keep the [rows x vocab] float32 logits small for long prompts.
        for start in range(lo, hi, PROMPT_LOGPROBS_CHUNK):
            end = min(start + PROMPT_LOGPROBS_CHUNK, hi)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[start - first_pos : end - first_pos]), -1)
            targets = torch.tensor(prompt[start + 1 : end + 1], device=logprobs.device)
            chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
            top = torch.topk(logprobs, k, dim=-1) if k > 0 else None
            for j in range(end - start):
                entry = {} if top is None else dict(zip(top.indices[j].tolist(), top.values[j].tolist()))
                entry[prompt[start + 1 + j]] = chosen[j]
                r.prompt_logprobs.append(entry)

    @staticmethod
    def _blocked(r: Request) -> list[int]:
        # Stop tokens cannot end a sequence before min_tokens.
        if len(r.output_ids) < r.params.min_tokens:
            return sorted(r.stop_ids)
        return []
