"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves between layers while training,
numerically as in PEFT 0.21 (``peft.tuners.adalora``).

Each adapted linear holds ``init_r`` triplets (row i of A, E_i, column i of B):

    y = W x + s / (ranknum + 1e-5) · B (A ⊙ E) dropout(x)     A: (r, in), E: (r, 1), B: (out, r)

with s = alpha itself (not alpha / r) and ranknum = init_r for the adapter's whole life. The allocator
(:class:`AdaLoraHook`) scores each triplet by smoothed ``|p · ∂L/∂p|`` and zeroes the E of the least
important ones, shrinking the total from init_r to target_r per layer on a cubic schedule.

PEFT's files: ``<path>.lora_A`` / ``lora_B`` / ``lora_E`` without ``.weight``, ranknum not saved. Once the
allocator has run, only the kept triplets' rows are saved, and ``adapter_config.json`` maps
``rank_pattern["<path>.lora_E"]`` to the init_r-long mask of kept triplets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loraforge.adapters.lora import LoraAdapter
from loraforge.adapters.model import adapted_layers
from loraforge.adapters.spec import AdapterError
from loraforge.config.schema import setting

TENSORS = ("lora_A", "lora_B", "lora_E")
"""PEFT's key suffixes of one AdaLoRA layer, in PEFT's parameter order."""


@dataclass
class AdaLoraOptions:
    """The allocator's settings (PEFT's ``AdaLoraConfig`` fields of the same names). Steps are optimizer
    steps counted from 0: warm-up while step <= tinit, the budget shrinks until total_step - tfinal, then
    the allocation stays fixed."""

    init_r: int = setting(12, "Rank of every adapted layer before allocation.", gt=0)
    target_r: int = setting(8, "Average rank per layer after allocation.", gt=0)
    tinit: int = setting(0, "Warm-up steps before any rank is pruned.", ge=0)
    tfinal: int = setting(0, "Final steps trained with the allocation fixed.", ge=0)
    deltaT: int = setting(1, "Steps between re-allocations while the budget shrinks.", gt=0)
    beta1: float = setting(0.85, "EMA factor of the sensitivity |p·grad|.", gt=0, lt=1)
    beta2: float = setting(0.85, "EMA factor of the sensitivity's uncertainty.", gt=0, lt=1)
    orth_reg_weight: float = setting(0.5, "Weight of the penalty keeping A's rows and B's columns orthonormal.", ge=0)
    total_step: int | None = setting(None, "Optimizer steps the schedule spans. null = the run's total steps.", gt=0)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.target_r > self.init_r:
            problems.append(("target_r", f"target_r ({self.target_r}) must be <= init_r ({self.init_r}): AdaLoRA "
                                         "only prunes ranks; lower target_r or raise init_r"))
        if self.total_step is not None:
            problems += self.schedule_problems(self.total_step)
        return problems

    def schedule_problems(self, total_step: int | None) -> list[tuple[str, str]]:
        """Whether a budget-shrinking phase fits into ``total_step`` optimizer steps (None: unknown)."""
        if total_step is None:
            return [("total_step", "unknown: set total_step, or train with a known number of steps "
                                   "(train.max_steps or train.epochs)")]
        if self.tinit >= total_step - self.tfinal:
            return [("tinit", f"tinit ({self.tinit}) must be < total_step - tfinal ({total_step} - {self.tfinal} = "
                              f"{total_step - self.tfinal}), or no step is left to shrink the rank budget; lower "
                              "tinit or tfinal, or raise total_step")]
        return []


class AdaLoraAdapter(nn.Module):
    """One layer's triplets, built as ``cls(base, r, scaling, dropout, init, options)``.

    Args:
        r: init_r, the number of triplets.
        scaling: PEFT's ``lora_alpha`` itself; the update is scaled by ``scaling / (ranknum + 1e-5)``.
        init: "kaiming" or "gaussian": E = 0, A and B ~ N(0, 0.02²) (PEFT's default; the output starts
            unchanged); "none": A, E, B ~ N(0, 1) (PEFT's ``init_lora_weights=False``).
        options: accepted for the shared constructor; the layer needs none of its fields.
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str,
                 options: AdaLoraOptions | None = None):
        super().__init__()
        self.init_r = r
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features))
        self.lora_E = nn.Parameter(torch.randn(r, 1))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r))
        self.register_buffer("ranknum", torch.tensor([float(r)]), persistent=False)
        self.rank_pattern: list[bool] | None = None
        """Which of the init_r triplets the rows stand for once pruned (PEFT's ``rank_pattern`` entry)."""
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init != "none":
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``(..., in)`` -> ``(..., out)``, in the operation order of PEFT's ``SVDLinear.forward``."""
        x = self.dropout(x.to(self.lora_A.dtype))
        out = (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (self.ranknum + 1e-5)
        return out.to(base_out.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``(out, in)``."""
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling / (self.ranknum + 1e-5)

    merge = LoraAdapter.merge  # delta_weight added to (or taken from) a dense base
    unmerge = LoraAdapter.unmerge

    def low_rank(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The update as a plain LoRA pair: ``delta(x) = scale · x A'ᵀ B'ᵀ`` with A' = (A ⊙ E) ``(r', in)`` and
        B' ``(out, r')`` over the r' triplets whose E is nonzero (r' = 0 for a fully pruned layer)."""
        kept = self.lora_E.detach().view(-1) != 0
        a = (self.lora_A * self.lora_E).detach()[kept]
        return a, self.lora_B.detach()[:, kept], self.scaling / (float(self.ranknum) + 1e-5)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The rows held now: all init_r while training (pruned triplets have E = 0), the kept ones after
        :meth:`prune` or after loading a pruned file."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy PEFT's tensors in. A file saved after allocation has r' <= init_r rows (0 for a fully pruned
        layer); the adapter shrinks to them and keeps ranknum = init_r, as PEFT does on load.

        Raises:
            AdapterError: the shapes disagree with each other, with the base layer, or with init_r.
        """
        rows = tensors["lora_A"].shape[0]
        expected = {"lora_A": (rows, self.lora_A.shape[1]), "lora_B": (self.lora_B.shape[0], rows),
                    "lora_E": (rows, 1)}
        wrong = [f"{k} {tuple(tensors[k].shape)} (needs {v})" for k, v in expected.items() if tensors[k].shape != v]
        if wrong or rows > self.init_r:
            raise AdapterError(f"AdaLoRA tensors don't fit this layer (init_r {self.init_r}, {rows} saved triplets): "
                               f"{', '.join(wrong) or 'more triplets than init_r'}; load them with the init_r, "
                               "target modules and base model they were saved with")
        if rows == self.lora_A.shape[0]:
            with torch.no_grad():
                for name in TENSORS:
                    getattr(self, name).copy_(tensors[name])
        else:
            self._resize(*(tensors[name] for name in TENSORS))
            self.rank_pattern = None if rows == self.init_r else [True] * rows + [False] * (self.init_r - rows)

    def prune(self, mask: Sequence[bool]) -> None:
        """Keep only the triplets where the init_r-long ``mask`` is true (PEFT's ``rank_pattern`` entry)."""
        if len(mask) != self.init_r or self.lora_A.shape[0] != self.init_r:
            raise AdapterError(f"prune needs an unpruned layer and a mask of init_r = {self.init_r} entries; got "
                               f"{len(mask)} entries for a layer of {self.lora_A.shape[0]} rows")
        keep = torch.tensor(list(mask), dtype=torch.bool, device=self.lora_A.device)
        self._resize(self.lora_A[keep], self.lora_B[:, keep], self.lora_E[keep])
        self.rank_pattern = [bool(m) for m in mask]

    def _resize(self, a: torch.Tensor, b: torch.Tensor, e: torch.Tensor) -> None:
        for name, value in zip(TENSORS, (a, b, e)):
            old = getattr(self, name)
            value = value.detach().to(old.device, old.dtype).clone()
            setattr(self, name, nn.Parameter(value, requires_grad=old.requires_grad))


class AdaLoraHook:
    """AdaLoRA's rank allocator and orthogonality penalty for one adapter (PEFT's ``RankAllocator``,
    ``AdaLoraModel.update_and_allocate`` and the penalty of ``AdaLoraModel.forward``).

    Once per optimizer step ``step`` (0-based, counting optimizer steps, not micro-batches)::

        (task_loss + hook.loss()).backward()    # add the penalty once per optimizer step
        optimizer.step()
        hook.after_optimizer_step(step)         # reads .grad, writes lora_E
        optimizer.zero_grad()

    and after the last step ``finish()``, before the final save.

    Raises:
        AdapterError: bad options or schedule (every problem at once), or no adapter ``adapter_name``.
    """

    def __init__(self, model: nn.Module, adapter_name: str, options: AdaLoraOptions, total_step: int | None = None):
        total = options.total_step if options.total_step is not None else total_step
        problems = options.check() + (options.schedule_problems(total) if options.total_step is None else [])
        if problems:
            raise AdapterError("AdaLoRA: " + "; ".join(f"{key}: {message}" for key, message in problems))
        self.options, self.total_step = options, total
        self.layers = {path: layer.adapters[adapter_name]
                       for path, layer in adapted_layers(model).items() if adapter_name in layer.adapters}
        if not self.layers:
            raise AdapterError(f"AdaLoRA: no adapter named {adapter_name!r} on this model to allocate ranks for")
        self.init_budget = sum(a.lora_A.shape[0] for a in self.layers.values())
        self.target_budget = options.target_r * len(self.layers)
        self.budget = self.init_budget
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        """Module path -> bool ``(init_r,)``, true for kept triplets; set by each allocation."""

    def loss(self) -> torch.Tensor:
        """``orth_reg_weight`` · mean over every A and B of ``‖A Aᵀ − I‖_F`` / ``‖BᵀB − I‖_F`` (not squared)."""
        total = 0
        for a in self.layers.values():
            for cov in (a.lora_A @ a.lora_A.T, a.lora_B.T @ a.lora_B):
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                total = total + torch.norm(cov - eye, p="fro")
        return self.options.orth_reg_weight * (total / (2 * len(self.layers)))

    def budget_at(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to re-allocate) at ``step``: init budget, cubic decay, target budget."""
        o, end = self.options, self.total_step - self.options.tfinal
        if step <= o.tinit:
            return self.init_budget, False
        if step > end:
            return self.target_budget, True
        remaining = 1 - (step - o.tinit) / (end - o.tinit)
        return int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget), step % o.deltaT == 0

    def after_optimizer_step(self, step: int) -> None:
        """Update the importance EMAs and prune to the budget (before total_step - tfinal), fix the final
        allocation (at it), or re-apply it (after it). Needs the step's gradients: call before zero_grad."""
        end = self.total_step - self.options.tfinal
        self.budget, reallocate = self.budget_at(step)
        if step < end:
            self._update_importance()
            if reallocate:
                self._mask_to_budget()
        elif step == end:
            self._mask_to_budget()
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        elif not self.masks:
            raise AdapterError(f"AdaLoRA: step {step} is past total_step - tfinal = {end}, but there is no final "
                               "allocation; resume with the hook's state_dict from the checkpoint")
        else:
            with torch.no_grad():
                for path, adapter in self.layers.items():
                    adapter.lora_E.masked_fill_(~self.masks[path].view(-1, 1), 0.0)

    def _update_importance(self) -> None:
        b1, b2 = self.options.beta1, self.options.beta2
        with torch.no_grad():
            for path, adapter in self.layers.items():
                for name in TENSORS:
                    p, key = getattr(adapter, name), f"{path}.{name}"
                    if p.grad is None:
                        raise AdapterError(f"AdaLoRA: {key} has no gradient; call after_optimizer_step after "
                                           "optimizer.step() and before optimizer.zero_grad()")
                    ipt = (p * p.grad).abs()
                    avg = b1 * self.exp_avg_ipt.get(key, torch.zeros_like(p)) + (1 - b1) * ipt
                    unc = b2 * self.exp_avg_unc.get(key, torch.zeros_like(p)) + (1 - b2) * (ipt - avg).abs()
                    self.exp_avg_ipt[key], self.exp_avg_unc[key] = avg, unc

    def _mask_to_budget(self) -> None:
        """Zero the E of every triplet scoring at or below the (init budget − budget)-th smallest score."""
        scores = {}
        for path in self.layers:
            s = {n: self.exp_avg_ipt[f"{path}.{n}"] * self.exp_avg_unc[f"{path}.{n}"] for n in TENSORS}
            scores[path] = s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))
        k = self.init_budget - self.budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k)[0].item() if k > 0 else -math.inf
        with torch.no_grad():
            for path, adapter in self.layers.items():
                pruned = scores[path] <= threshold
                adapter.lora_E.masked_fill_(pruned.view(-1, 1), 0.0)
                self.masks[path] = ~pruned

    def rank_pattern(self) -> dict[str, list[bool]]:
        """Module path -> kept-triplet mask of the last allocation ({} before the first); PEFT stores it in
        ``adapter_config.json`` as ``rank_pattern["<path>.lora_E"]``."""
        return {path: mask.tolist() for path, mask in self.masks.items()}

    def finish(self) -> None:
        """Drop the rows of pruned triplets, as PEFT's saved files do; call once after the last step."""
        for path, mask in self.masks.items():
            self.layers[path].prune(mask.tolist())

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Everything a bit-exact resume needs: ``total_step``, ``budget``, and the tensors
        ``exp_avg_ipt.<path>.<lora_X>``, ``exp_avg_unc.<path>.<lora_X>`` and ``rank_pattern.<path>`` (bool)."""
        state: dict[str, torch.Tensor | int] = {"total_step": self.total_step, "budget": self.budget}
        for prefix, tensors in (("exp_avg_ipt", self.exp_avg_ipt), ("exp_avg_unc", self.exp_avg_unc),
                                ("rank_pattern", self.masks)):
            state.update({f"{prefix}.{key}": t.detach().clone() for key, t in tensors.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        """Restore :meth:`state_dict`'s output. Raises ``AdapterError`` if it belongs to another schedule or model."""
        if int(state["total_step"]) != self.total_step:
            raise AdapterError(f"AdaLoRA state was saved with total_step {int(state['total_step'])}, but this run "
                               f"has {self.total_step}; resume with the same schedule")
        loaded: dict[str, dict[str, torch.Tensor]] = {"exp_avg_ipt": {}, "exp_avg_unc": {}, "rank_pattern": {}}
        for key, value in state.items():
            kind, _, rest = key.partition(".")
            if kind not in loaded:
                continue
            path = rest if kind == "rank_pattern" else rest.rpartition(".")[0]
            if path not in self.layers:
                raise AdapterError(f"AdaLoRA state has {key}, but this model has no such adapted layer; resume "
                                   "with the target modules it was saved with")
            loaded[kind][rest] = value.to(self.layers[path].lora_A.device)
        self.exp_avg_ipt, self.exp_avg_unc, self.masks = loaded.values()
        self.budget = int(state["budget"])


def check_spec(spec) -> list[tuple[str, str]]:
    """AdaLoRA's rules on the rest of the adapter section: it allocates ranks itself and scales by alpha."""
    problems = [(key, "does not apply to adalora, which allocates ranks itself from options.init_r to "
                      "options.target_r; remove it") for key in ("rank_pattern", "alpha_pattern")
                if getattr(spec, key)]
    if spec.use_rslora:
        problems.append(("use_rslora", "does not apply to adalora, whose update is scaled by alpha / init_r"))
    return problems


def peft_fields(spec, model: nn.Module, name: str, paths: list[str]) -> dict:
    """AdaLoRA's fields of ``adapter_config.json``: the options, and ``rank_pattern`` as PEFT writes it
    (``"<path>.lora_E"`` -> init_r-long mask of kept triplets; null before any allocation).

    Raises:
        AdapterError: ``total_step`` is unknown (PEFT refuses to load such a file).
    """
    options: AdaLoraOptions = spec.options
    if options.total_step is None:
        raise AdapterError("adapter.options.total_step is unknown: set it, or save the adapter of a training run "
                           "(which fills it in); PEFT can't load an AdaLoRA file without it")
    layers = {path: layer.adapters[name] for path, layer in adapted_layers(model).items() if path in paths}
    masks = {f"{path}.lora_E": adapter.rank_pattern for path, adapter in layers.items()
             if adapter.rank_pattern is not None}
    return {"init_r": options.init_r, "target_r": options.target_r, "tinit": options.tinit, "tfinal": options.tfinal,
            "deltaT": options.deltaT, "beta1": options.beta1, "beta2": options.beta2,
            "orth_reg_weight": options.orth_reg_weight, "total_step": options.total_step,
            "rank_pattern": masks or None}


def from_peft(config: dict) -> dict:
    """``AdapterSpec`` fields from a PEFT ``AdaLoraConfig``."""
    defaults = AdaLoraOptions()
    options = AdaLoraOptions(**{f: config.get(f, getattr(defaults, f)) for f in defaults.__dataclass_fields__})
    return {"options": options, "rank_pattern": {}}


def rank_from_peft(config: dict, tensors: dict) -> int:
    """Layers are built with init_r triplets and then pruned to the file's ``rank_pattern``."""
    return int(config.get("init_r", AdaLoraOptions().init_r))


def after_load(adapter: AdaLoraAdapter, path: str, config: dict) -> None:
    """Prune a freshly built layer to the file's ``rank_pattern`` mask, as PEFT does before loading."""
    mask = (config.get("rank_pattern") or {}).get(f"{path}.lora_E")
    if mask is not None:
        adapter.prune(mask)
