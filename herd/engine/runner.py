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
    def __init__(self, model: Llama4TextModel, cache: KVCache, device: torch.device, vision_model=None, grammars=None):
        self.model = model
        self.cache = cache
        self.device = device
        self.vision_model = vision_model  # None for text-only checkpoints
        self.grammars = grammars  # a GrammarManager, or a callable that makes one (first use)

    def _encode_images(self, requests: list[Request]) -> None:
        """Runs the vision tower once over every tile of every image these requests still need
        (early fusion: the features stand in for the embeddings of the <|patch|> tokens)."""
        images = [image for r in requests for image in r.images]
        tiles = torch.cat([image.pixel_values for image in images]).to(self.device)
        features = self.vision_model(tiles.to(self.model.embed_tokens.weight.dtype))
        features = features.reshape(-1, features.shape[-1])
        offset = 0
        for r in requests:
            count = sum(len(image.patch_positions) for image in r.images)
            r.image_features = features[offset : offset + count]
            offset += count

    def _input_embeddings(self, batch: list[ScheduledSeq], input_ids: torch.Tensor) -> torch.Tensor | None:
        """Token embeddings with image features in place of <|patch|> tokens; None if no images."""
        touching = [
            item for item in batch if item.request.images and item.request.num_computed <= item.request.last_patch_position
        ]
        if not touching:
            return None
        missing = [item.request for item in touching if item.request.image_features is None]
        if missing:
            self._encode_images(missing)
        embeds = self.model.embed_tokens(input_ids)
        row = 0
        for item in batch:
            r = item.request
            start, end = r.num_computed, r.num_computed + item.num_new
            if item in touching:
                positions = torch.tensor([p for image in r.images for p in image.patch_positions], device=self.device)
                inside = ((positions >= start) & (positions < end)).nonzero()[:, 0]
                embeds[row + positions[inside] - start] = r.image_features[inside].to(embeds.dtype)
            row += item.num_new
        return embeds

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
        embeds = self._input_embeddings(batch, input_ids)
        hidden = self.model(input_ids, meta, self.cache.layers, inputs_embeds=embeds)
        for item in batch:
            r = item.request
            if r.image_features is not None and r.num_computed + item.num_new > r.last_patch_position:
                r.image_features = None  # the prefill is past its images: the KV cache has them
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
            rows_hidden = hidden[torch.tensor(sample_rows, device=self.device)]
            logits = self.model.compute_logits(rows_hidden, upcast=False)
            constrained = [
                (j, item.request.grammar)
                for j, item in enumerate(i for i in batch if i.request.num_computed + i.num_new == i.request.num_tokens)
                if item.request.grammar is not None
            ]
            if constrained:
                # One bitmask for all constrained rows, applied before penalties and sampling.
                # Logprobs stay the model's own: a copy before masking, only when a row wants them.
                wants_logprobs = any(rows[j].params.logprobs is not None for j, _ in constrained)
                model_logits = logits.clone() if wants_logprobs else None
                self.grammars.apply(logits, constrained)
            else:
                model_logits = None
            sampled = iter(sample(logits, rows, model_logits))
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
        # Stop tokens cannot end a sequence before min_tokens (a grammar decides its own end).
        if len(r.output_ids) < r.params.min_tokens and r.grammar is None:
            return sorted(r.stop_ids)
        return []
