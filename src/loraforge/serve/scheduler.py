"""Continuous batching over one memory pool: which sequences run each step, and with which pages.

Every step, running sequences first get the KV page their next token needs. If the pool is full,
idle adapters are evicted; if it is still full, the most recently admitted sequence is preempted
(its pages freed, its tokens kept) and goes back to the front of the queue, to be recomputed later.
Then waiting sequences are admitted in arrival order while their adapter and prompt fit. A request
that doesn't fit may be overtaken by ones that do (their adapter is resident, or they need none),
but only ``max_bypass`` times: after that nobody is admitted ahead of it, so running sequences
finish, free their pages, and it gets in. No allocation ever exceeds the pool.

Admission looks at no more than the first ``max_lookahead`` waiting sequences, and stops as soon as
the batch, the token budget or the pool is full: a step costs the same with ten or ten thousand
requests queued.

A step runs at most ``max_batch_tokens`` tokens: every decode first (one token each), then prompt
chunks. A prompt longer than what is left of the budget is prefilled in chunks over several steps
(chunked prefill), so one long prompt never stalls the decodes running beside it. (A prompt with
images is prefilled whole: its image features replace tokens anywhere in it.)

With a ``PrefixCache``, admission looks up the longest cached run of the prompt's full KV blocks
(keyed by the adapter's content hash and the tokens, see ``serve.prefix_cache``), shares those pages
and prefills only the rest; the blocks a step completes are added to the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice

import torch

from loraforge.serve.adapter_store import Adapter, AdapterStore
from loraforge.serve.lora_ops import Segments
from loraforge.serve.paged_kv import PagedKVCache
from loraforge.serve.prefix_cache import BASE_ROOT, PrefixCache, extend_block_hashes
from loraforge.serve.runner import StepBatch
from loraforge.serve.sampling import SamplingParams
from loraforge.serve.vision import PromptVision, text_positions


@dataclass(eq=False)
class Sequence:
    """One request's tokens and its share of the pool."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    """Output tokens allowed, after capping to the context and the pool."""
    adapter_name: str | None = None
    output_ids: list[int] = field(default_factory=list)
    adapter: Adapter | None = None
    """Set while the sequence holds a reference on its (resident) adapter."""
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    """Tokens whose K/V are in the cache; the next step computes the tokens after them."""
    num_new: int | None = None
    """Tokens the step being run computes (a chunk of the prompt, or 1 to decode); None: all the rest."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of the first full blocks of ``tokens`` (extended as blocks fill)."""
    num_inserted: int = 0
    """Blocks of ``block_table`` that are in the prefix cache (shared on admission or inserted since)."""
    num_expected: int = 0
    """Blocks of the prompt that admission told the prefix cache this sequence computes (``PrefixCache.expect``)."""
    bypassed: int = 0
    vision: PromptVision | None = None
    """The prompt's images and M-RoPE positions (a vision-language model's request with images)."""

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_range(self, start: int, end: int) -> list[int]:
        """``tokens[start:end]`` without copying the whole list."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - n)]

    @property
    def cacheable(self) -> bool:
        """Whether its blocks may be shared: not with images, whose token ids don't name their pixels."""
        return self.vision is None


@dataclass
class Scheduled:
    prefills: list[Sequence]
    decodes: list[Sequence]
    finished: list[Sequence]
    """Sequences ended by the scheduler: alone in the pool and still out of pages (finish "length")."""


class Scheduler:
    def __init__(self, kv: PagedKVCache, store: AdapterStore, max_num_seqs: int, max_batch_tokens: int, max_bypass: int,
                 max_lookahead: int, prefix_cache: PrefixCache | None = None):
        self.kv = kv
        self.store = store
        self.pool = kv.pool
        self.cache = prefix_cache or PrefixCache(self.pool, enabled=False)
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_bypass = max_bypass
        self.max_lookahead = max_lookahead
        self.waiting: OrderedDict[str, Sequence] = OrderedDict()
        """By request id, in admission order (preempted sequences go first); removal anywhere is O(1)."""
        self.running: list[Sequence] = []
        """In admission order: the oldest first, the next to be preempted last."""
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting[seq.request_id] = seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Scheduled:
        """Plan one step; every sequence in ``prefills`` and ``decodes`` has ``num_new`` set."""
        finished = self._grow_running()
        decodes, chunked = [], []
        for seq in self.running:
            (decodes if seq.num_tokens - seq.num_cached == 1 else chunked).append(seq)
        for seq in decodes:
            seq.num_new = 1
        budget = self.max_batch_tokens - len(decodes)
        prefills = []
        for seq in chunked:  # prompts already being prefilled go on, oldest first
            if budget <= 0:
                break
            seq.num_new = min(seq.num_tokens - seq.num_cached, budget)
            budget -= seq.num_new
            prefills.append(seq)
        prefills += self._admit(budget, first=not prefills)
        return Scheduled(prefills, decodes, finished)

    def cache_blocks(self, seq: Sequence) -> None:
        """Add the blocks of ``seq`` that are now full (K/V final) to the prefix cache."""
        full = seq.num_cached // self.kv.block_size
        if full > seq.num_inserted and seq.cacheable and self.cache.enabled:
            keys = self._block_hashes(seq, seq.tokens, full)
            self.cache.insert(keys[seq.num_inserted:full], seq.block_table[seq.num_inserted:full])
            self.cache.expect(keys[seq.num_inserted:min(full, seq.num_expected)], done=True)
            seq.num_inserted = full

    def _block_hashes(self, seq: Sequence, tokens: list[int], num_blocks: int) -> list[bytes]:
        root = BASE_ROOT if seq.adapter_name is None else self.store.get(seq.adapter_name).content_hash
        return extend_block_hashes(seq.block_hashes, root, tokens, self.kv.block_size, num_blocks)

    def free(self, seq: Sequence) -> None:
        """Take ``seq`` out of the scheduler wherever it is and give back its pages and adapter."""
        if self.waiting.get(seq.request_id) is seq:
            del self.waiting[seq.request_id]
        elif seq in self.running:
            self.running.remove(seq)
        self._release(seq)

    def _grow_running(self) -> list[Sequence]:
        finished = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = self.kv.blocks_for(seq.num_cached + 1) - len(seq.block_table)
            while need > 0 and not self._take_pages(seq, need):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    self.free(seq)
                    finished.append(seq)
                    break
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                i += 1
        return finished

    def _admit(self, budget: int, first: bool) -> list[Sequence]:
        """Admit waiting sequences into what is left of the step's ``budget``. A prompt is prefilled in
        chunks of at most the budget left; one that can't be chunked (images) needs room for all of it,
        unless it is the ``first`` prefill of the step."""
        admitted: list[Sequence] = []
        candidates = list(islice(self.waiting.values(), self.max_lookahead))
        head = candidates[0] if candidates else None
        head_waiting = head is not None
        reclaimable = self.pool.num_free + self.store.evictable_pages()
        for seq in candidates:
            if len(self.running) >= self.max_num_seqs or reclaimable == 0 or budget <= 0 and not (first and not admitted):
                break  # every sequence needs a slot in the batch, a KV page and a token of budget
            if seq is not head and head_waiting and head.bypassed >= self.max_bypass:
                break
            tokens = seq.tokens
            num_tokens = len(tokens)
            whole = not seq.cacheable  # prefilled in one step
            if (budget <= 0 and not whole) or (whole and num_tokens > budget and (admitted or not first)):
                continue
            hits, keys = [], []
            if seq.cacheable and self.cache.enabled:  # the last token is always computed: its logits are needed
                keys = self._block_hashes(seq, tokens, (num_tokens - 1) // self.kv.block_size)
                hits = self.cache.match(keys)
                if len(hits) < len(keys) and self.cache.pending(keys[len(hits)]):
                    continue  # another request is computing its next block: share it next step
            kv_pages = self.kv.blocks_for(num_tokens) - len(hits)
            pages = kv_pages + self.cache.idle_among(hits)
            adapter_pages = self.store.pages_to_load(seq.adapter_name) if seq.adapter_name else 0
            if pages + adapter_pages > reclaimable or not self.store.make_room(pages + adapter_pages, keep=seq.adapter_name):
                continue
            seq.block_table = self.cache.take(hits, 0)  # the shared pages first: loading the adapter may reuse idle pages
            if seq.adapter_name:
                seq.adapter = self.store.acquire(seq.adapter_name)
            seq.block_table += self.cache.take([], kv_pages)
            seq.num_cached, seq.num_inserted = len(hits) * self.kv.block_size, len(hits)
            self.cache.expect(keys[len(hits):])
            seq.num_expected = len(keys)
            seq.num_new = num_tokens - seq.num_cached if whole else min(num_tokens - seq.num_cached, budget)
            del self.waiting[seq.request_id]
            self.running.append(seq)
            admitted.append(seq)
            budget -= seq.num_new
            reclaimable = self.pool.num_free + self.store.evictable_pages()
            if seq is head:
                head_waiting = False
            elif head_waiting:
                head.bypassed += 1
        return admitted

    def _take_pages(self, seq: Sequence, n: int) -> bool:
        if not self.store.make_room(n):
            return False
        seq.block_table += self.cache.take([], n)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.waiting[seq.request_id] = seq
        self.waiting.move_to_end(seq.request_id, last=False)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.cache.release(seq.block_table)
            seq.block_table = []
        if seq.num_expected > seq.num_inserted:
            self.cache.expect(seq.block_hashes[seq.num_inserted:seq.num_expected], done=True)
        seq.num_cached = seq.num_inserted = seq.num_expected = 0
        if seq.adapter is not None:
            self.store.release(seq.adapter)
            seq.adapter = None


def group_by_adapter(seqs: list[Sequence]) -> list[Sequence]:
    """``seqs`` with each adapter's sequences adjacent (base-model ones first), otherwise in order.

    Adjacent sequences of one adapter form one LoRA segment, so fewer, larger matmuls run.
    """
    rank: dict[str | None, int] = {None: -1}
    for seq in seqs:
        rank.setdefault(seq.adapter_name, len(rank))
    return sorted(seqs, key=lambda seq: rank[seq.adapter_name])


def pack_step(seqs: list[Sequence], kv: PagedKVCache) -> StepBatch:
    """Pack one step's tokens, in ``seqs`` order: each sequence computes its ``num_new`` tokens after its
    ``num_cached`` ones (all the rest when ``num_new`` is None). One new token after cached ones is a
    decode; more are a prefill (a whole prompt, with any tokens generated before a preemption), or a
    prefill chunk that also attends to the sequence's cached tokens (``StepBatch.extends``).

    Each sequence's block table must already cover the tokens of this step. The logits asked for
    are those of the last token of each sequence whose step reaches its last token, in ``seqs`` order.
    When a sequence carries images (``Sequence.vision``), the batch also has every token's M-RoPE
    positions and the prefills' pixels.
    """
    ids, positions, pages, offsets, logit_rows = [], [], [], [], []
    prefills, extends, decode_rows, tables, lens = [], [], [], [], []
    runs, adapters = [], []
    device = kv.blocks.device
    multimodal = any(seq.vision is not None for seq in seqs)
    mrope, images = [], []
    for seq in seqs:
        start = len(ids)
        first, num_tokens = seq.num_cached, seq.num_tokens
        end_token = num_tokens if seq.num_new is None else first + seq.num_new
        tokens = seq.token_range(first, end_token)
        if first == 0:
            prefills.append((start, start + len(tokens)))
        elif len(tokens) == 1:
            decode_rows.append(start)
            tables.append(seq.block_table)
            lens.append(first + 1)
        else:
            extends.append((start, start + len(tokens), first, _long(seq.block_table[:kv.blocks_for(end_token)], device)))
        ids += tokens
        positions += range(first, first + len(tokens))
        if multimodal:
            end = first + len(tokens)
            vision = seq.vision
            mrope.append(text_positions(first, end, device) if vision is None else vision.token_positions(first, end))
            if vision is not None and first == 0:
                images.append((start, len(ids), vision.pixel_values, vision.image_grid_thw))
        p, o = kv.slots(seq.block_table, first, first + len(tokens))
        pages += p
        offsets += o
        if end_token == num_tokens:
            logit_rows.append(len(ids) - 1)
        if seq.adapter is not None:
            if adapters and adapters[-1] is seq.adapter and runs[-1][1] == start:
                runs[-1][1] = len(ids)
            else:
                adapters.append(seq.adapter)
                runs.append([start, len(ids), len(adapters) - 1])
    width = max((len(t) for t in tables), default=0)
    return StepBatch(
        input_ids=_long(ids, device),
        positions=_long(positions, device),
        slot_pages=_long(pages, device),
        slot_offsets=_long(offsets, device),
        prefills=prefills,
        extends=extends,
        decode_rows=_long(decode_rows, device),
        decode_tables=_long([t + [0] * (width - len(t)) for t in tables], device).view(len(tables), width),
        decode_lens=_long(lens, device),
        logit_rows=_long(logit_rows, device),
        segments=Segments.from_runs([tuple(r) for r in runs], len(ids)) if runs else None,
        adapters=adapters,
        mrope_positions=torch.cat(mrope, dim=1) if multimodal else None,
        images=images,
    )


def _long(values, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
