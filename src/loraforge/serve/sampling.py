"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds.

``temperature=0`` means greedy decoding; it is never replaced by a default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next tokens and when it stops."""

    temperature: float = 1.0
    """0 picks the most likely token (greedy); higher values flatten the distribution."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability mass reaches ``top_p`` (1 = all)."""
    top_k: int = 0
    """Sample from the ``top_k`` most likely tokens only (0 = no limit)."""
    max_tokens: int | None = None
    """Most tokens to generate; ``None`` = as many as the context and the memory pool allow."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends before the first occurrence, which is not returned."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (in addition to EOS unless ``ignore_eos``)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks do, to control output lengths)."""
    seed: int | None = None
    """Seed of this request's own random generator: the same seed gives the same tokens, whatever the batch."""

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k={self.top_k!r} must be an integer >= 0 (0 = no limit)")
        if self.max_tokens is not None and not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            problems.append(f"max_tokens={self.max_tokens!r} must be an integer >= 1, or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop={self.stop!r} must hold non-empty strings")
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64):
            problems.append(f"seed={self.seed!r} must be an integer in [-2**63, 2**64), or None")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request; unseeded requests draw their seed from torch's global RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """The next token of each row of ``logits`` ``(S, vocab)``, row ``i`` following ``params[i]``.

    Greedy rows take the argmax (ties go to the lowest id, like ``torch.argmax``). Other rows are
    sampled with their own generator, so a seeded request draws the same tokens in any batch.
    """
    logits = logits.float().cpu()  # the per-request generators live on the CPU
    chosen = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        # float64, so that a tiny temperature or top_p doesn't round to 0; shifted to <= 0, so it can't overflow.
        row = (logits[i].double() - logits[i].max()) / p.temperature
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            mass_before = sorted_probs.cumsum(0) - sorted_probs
            sorted_probs[mass_before >= p.top_p] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return chosen
