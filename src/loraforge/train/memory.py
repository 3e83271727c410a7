"""Will this run fit? A memory estimate of one training run, before any weight is loaded.

The model is built on the ``meta`` device (no memory, no weights read), quantized and given its adapter
exactly as ``train.run.prepare_model`` would, so the parameter, adapter and quantized-storage counts are
the real ones for any architecture, adapter method and quantization. Activations are counted the same
way: one forward pass of the meta model under ``FakeTensorMode`` with a saved-tensor hook records every
tensor autograd keeps for backward (each storage once, parameters excluded). Nothing is modelled by
hand except:

- attention, counted as a fused (flash / memory-efficient) kernel keeps it: q, k, v, output and the
  log-sum-exp, never the (T, T) probabilities, which is what ``sdpa`` runs on CPU and CUDA for
  unpadded causal batches;
- the worst case for length: every sample fills ``data.cutoff_len`` and every position carries a label
  (padding never makes a batch longer than the cutoff);
- gradient checkpointing: the layer inputs, plus one layer's activations while it is recomputed;
- bf16 autocast (``train.precision: bf16``): activations counted in bf16 (autocast keeps a few
  reductions in fp32, so this is slightly low);
- ``runtime``: on CPU the resident memory of a fresh Python that has imported the training stack
  (measured once per process, in a subprocess); on CUDA zero, as in ``torch.cuda.max_memory_allocated``
  (what a run reports), which leaves out the CUDA context (a few hundred MiB; ``HEADROOM`` covers it);
- ``allocator`` (CPU, ``train.cpu_allocator: fast`` only): glibc's heap slack, ``CPU_HEAP_SLACK`` of the
  batch-sized terms.

On CPU, ``train.cpu_allocator: compact`` fixes glibc's mmap threshold (``utils.memory.return_large_blocks_on_free``),
so every activation-sized block is unmapped when freed and the peak RSS is the live tensors counted here. With
glibc's default, rising threshold (``fast``), the forward pass's freed temporaries stay resident as heap gaps
whose size depends on the allocation order, not on any size the config gives: +1.0 GiB on the default model at
batch 4x256, almost none on a 1B Llama. ``CPU_HEAP_SLACK`` is fitted to the first, so for ``fast`` the estimate
is an upper bound (+20% on the 1B Llama, ``benchmarks/memory_estimate.py``). CUDA's caching allocator is
measured as allocated, without slack.

Not covered: vision-language models (``EstimateError``); ``init: pissa`` is counted as kaiming (same
shapes); a method that needs a quantized base (QA-LoRA) has its activations counted as LoRA's (more).

``benchmarks/memory_estimate.py`` compares the total with measured peaks.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loraforge.config import Config
from loraforge.train.loss import summed_cross_entropy

COMPONENTS = ("runtime", "weights", "adapter", "gradients", "optimizer", "activations", "logits", "allocator")
"""The parts of the estimate, in the order they are reported."""

OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "paged_adamw": 8, "adamw_8bit": 2}
"""Optimizer state per trainable parameter: two fp32 moments, or two 8-bit moments (block constants aside)."""

CPU_HEAP_SLACK = 0.55
"""With ``train.cpu_allocator: fast`` on CPU, the resident memory glibc's heap keeps beyond the live tensors, as
a share of the batch-sized terms (activations and logits): peak RSS with glibc's defaults against the same run
with ``compact``, on the default model (``benchmarks/memory_estimate.py``); an upper bound elsewhere."""

HEADROOM = 0.9
"""A run "fits" when the estimate is at most this share of the available memory (fragmentation, the
data pipeline and the allocator's rounding take the rest)."""


class EstimateError(ValueError):
    """The estimate can't be made for this config (e.g. a model kind the estimate doesn't know)."""


@dataclass(frozen=True)
class Change:
    """One suggested change: the overrides to apply, and the total it would lead to."""

    overrides: tuple[str, ...]
    why: str
    total_bytes: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component (see ``COMPONENTS``) against the memory ``device`` has available."""

    device: str
    available_bytes: int
    components: dict[str, int]
    tokens_per_micro_batch: int
    changes: list[Change] = field(default_factory=list)
    loading_bytes: int = 0
    """The peak while a quantized base is first built (``_Parts.loading_bytes``); 0 without quantization."""

    @property
    def total_bytes(self) -> int:
        return max(sum(self.components.values()), self.loading_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= HEADROOM * self.available_bytes

    @property
    def verdict(self) -> str:
        """One line: fits, or "won't fit" with the reason (the largest component)."""
        total, budget = _gib(self.total_bytes), _gib(HEADROOM * self.available_bytes)
        if self.fits:
            return f"fits: about {total} of the {budget} usable on {self.device}"
        if self.loading_bytes > sum(self.components.values()):
            return (f"won't fit: about {total} needed but {budget} usable on {self.device}, while the quantized "
                    f"base is built (the dense weights it is quantized from)")
        largest = max(self.components, key=self.components.get)
        return (f"won't fit: about {total} needed but {budget} usable on {self.device}; the largest part is "
                f"{largest} ({_gib(self.components[largest])})")

    def report(self) -> str:
        """A small table, the verdict, and the changes that would help (for the CLI and the web UI)."""
        lines = [f"memory estimate on {self.device} ({self.tokens_per_micro_batch} tokens per micro-batch):"]
        for name in COMPONENTS:
            lines.append(f"  {name:<12}{_gib(self.components[name]):>12}")
        if self.loading_bytes:
            lines.append(f"  {'(loading)':<12}{_gib(self.loading_bytes):>12}  peak while the quantized base is "
                         f"first built; later runs read it from the cache")
        lines.append(f"  {'total':<12}{_gib(self.total_bytes):>12}")
        lines.append(self.verdict)
        if not self.fits:
            helping = [c for c in self.changes if c.total_bytes < self.total_bytes]
            if helping:
                lines.append("what would help:")
            for change in helping:
                mark = "fits" if change.total_bytes <= HEADROOM * self.available_bytes else "still too big"
                lines.append(f"  {' '.join(change.overrides)}: {change.why} -> {_gib(change.total_bytes)} ({mark})")
        return "\n".join(lines)


def estimate_memory(config: Config, device: torch.device | str | None = None) -> MemoryEstimate:
    """Estimate the peak memory of training ``config`` on ``device`` (default: CUDA if visible, else CPU).

    Raises:
        ModelSourceError: the model source can't be resolved (its message says what would be right).
        EstimateError: the model can't be built as a causal LM on the meta device.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = _Parts.of(config, device)
    components = parts.components(config)
    estimate = MemoryEstimate(str(device), _available_bytes(device), components,
                              config.train.batch_size * config.data.cutoff_len, loading_bytes=parts.loading_bytes)
    if estimate.fits:
        return estimate
    return dataclasses.replace(estimate, changes=_changes(config, parts, device))


@dataclass
class _Parts:
    """What one meta build of the model yields; the components of any batch shape follow from it."""

    weight_bytes: int
    adapter_bytes: int
    trainable: int
    activation_bytes_per_token: float
    """Saved decoder activations per token, without gradient checkpointing."""
    hidden_bytes_per_token: int
    """One layer's input per token (what gradient checkpointing keeps per layer)."""
    layers: int
    logit_bytes_per_token: int
    runtime_bytes: int
    cpu: bool
    loading_bytes: int
    """With a quantized base (not ``gguf``) built for the first time (not in the cache yet): the runtime, the quantized weights and
    what the loader holds dense beside them: the largest safetensors shard of a folder it streams
    (``models.streaming_load``; the shard's mapped pages stay resident until it is closed), else the whole
    dense model (a GGUF or in-process source is dequantized first). 0 without such a quantization."""

    def total(self, config: Config) -> int:
        return max(sum(self.components(config).values()), self.loading_bytes)

    @classmethod
    def of(cls, config: Config, device: torch.device) -> _Parts:
        model = _meta_model(config, quantized=True)
        params = {id(p): p for p in model.parameters()}.values()
        weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in (*params, *model.buffers())}.values()
                      if not t.requires_grad)
        if config.model.quantization is not None and config.model.quantization.type == "gguf":
            weights = _gguf_weight_bytes(config.model.source)
        trainable = [p for p in params if p.requires_grad]
        act_dtype = torch.bfloat16 if config.train.precision == "bf16" else _dtype_of(config)
        tokens = 64
        # a quantized linear keeps no more for backward than a frozen dense one, and fake tensors can't
        # run the dequantization's table lookups: count activations on the dense build
        dense = model if config.model.quantization is None else _meta_model(config, quantized=False)
        activations, logits = _saved_bytes(dense, tokens, act_dtype)
        loading = 0
        if config.model.quantization is not None and config.model.quantization.type != "gguf" \
                and not _quantized_base_cached(config, device):
            loading = runtime_bytes(device) + weights + _dense_held_while_quantizing(config.model.source, dense)
        hidden = model.config.hidden_size * torch.empty((), dtype=act_dtype).element_size()
        return cls(weight_bytes=weights,
                   adapter_bytes=sum(p.numel() * p.element_size() for p in trainable),
                   trainable=sum(p.numel() for p in trainable),
                   activation_bytes_per_token=activations / tokens,
                   hidden_bytes_per_token=hidden,
                   layers=model.config.num_hidden_layers,
                   logit_bytes_per_token=logits // tokens,
                   runtime_bytes=runtime_bytes(device),
                   cpu=device.type == "cpu",
                   loading_bytes=loading)

    def components(self, config: Config) -> dict[str, int]:
        tokens = config.train.batch_size * config.data.cutoff_len
        activations = self.activation_bytes_per_token * tokens
        one_layer = activations / self.layers
        if config.train.gradient_checkpointing:  # the layer inputs, and one layer recomputed at a time
            activations = self.layers * self.hidden_bytes_per_token * tokens + one_layer
        activations += one_layer  # the gradients of the layer being differentiated
        # the loss keeps the logits and turns them into their own gradient in backward (train.loss.summed_cross_entropy)
        logits = self.logit_bytes_per_token * tokens
        return {
            "runtime": self.runtime_bytes,
            "weights": self.weight_bytes,
            "adapter": self.adapter_bytes,
            "gradients": self.adapter_bytes,
            "optimizer": self.trainable * OPTIMIZER_BYTES_PER_PARAM[config.train.optim],
            "activations": int(activations),
            "logits": int(logits),
            "allocator": int(CPU_HEAP_SLACK * (activations + logits))
            if self.cpu and config.train.cpu_allocator == "fast" else 0,
        }


def _changes(config: Config, parts: _Parts, device: torch.device) -> list[Change]:
    """The usual remedies, each with the total it leads to (only the quantization one needs a new build)."""
    train, data = config.train, config.data
    candidates: list[tuple[tuple[str, ...], str]] = []
    if not train.gradient_checkpointing:
        candidates.append((("train.gradient_checkpointing=true",), "recompute activations in backward"))
    if parts.cpu and train.cpu_allocator == "fast":
        candidates.append((("train.cpu_allocator=compact",), "return freed activation memory to the OS (slower steps)"))
    if train.batch_size > 1:
        half = train.batch_size // 2
        candidates.append(((f"train.batch_size={half}", f"train.grad_accum={train.grad_accum * 2}"),
                           "half the micro-batch, same tokens per optimizer step"))
    if data.cutoff_len > 128:
        candidates.append(((f"data.cutoff_len={data.cutoff_len // 2}",), "shorter samples (longer ones are cut)"))
    changes = []
    for overrides, why in candidates:
        changed = _with_overrides(config, overrides)
        changes.append(Change(overrides, why, parts.total(changed)))
    if config.model.quantization is None and not config.adapter.init.startswith("pissa"):
        overrides = ("model.quantization={type: nf4}",)
        changed = _with_overrides(config, overrides)
        changes.append(Change(overrides, "QLoRA: the frozen base in 4-bit NF4",
                              _Parts.of(changed, device).total(changed)))
    return sorted(changes, key=lambda c: c.total_bytes)


def _with_overrides(config: Config, overrides: tuple[str, ...]) -> Config:
    from loraforge.config.load import apply_overrides

    data = config.to_dict()
    apply_overrides(data, overrides, {})
    return Config.from_dict(data, check_files=False)


def _dtype_of(config: Config) -> torch.dtype:
    from loraforge.models.sources import DTYPES

    return DTYPES[config.model.dtype]


def _quantized_base_cached(config: Config, device: torch.device) -> bool:
    """Whether a run would read its quantized base from the cache (``models.quantized_base``), not build it."""
    from loraforge.models.quantized_base import cache_entry

    entry = cache_entry(config.model, device)
    return entry is not None and entry.is_dir()


def _dense_held_while_quantizing(source: str, dense: nn.Module) -> int:
    """Bytes a first quantized load holds dense: a streamed folder's largest shard, else the dense model."""
    shards = list(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    if shards:
        return max(shard.stat().st_size for shard in shards)
    tensors = {id(t): t for t in (*dense.parameters(), *dense.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in tensors if not t.requires_grad)


def _meta_model(config: Config, quantized: bool) -> nn.Module:
    """The model as training builds it (dtype, quantization if ``quantized``, adapter), on the meta device."""
    from loraforge.adapters import add_adapter, mark_only_adapters_trainable
    from loraforge.adapters.registry import method
    from loraforge.models.prepare import _quantize

    model_config = model_architecture(config.model.source)
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, dtype=_dtype_of(config),
                                                     attn_implementation="sdpa")
    except (ValueError, KeyError) as err:
        raise EstimateError(f"model.source {config.model.source!r}: the memory estimate builds causal language "
                            f"models only, and this one can't be built as one ({err})") from None
    quant = config.model.quantization
    if quantized and quant is not None and quant.type != "gguf":
        model = _quantize(model, config.model)
    spec = config.adapter
    if spec.init.startswith("pissa"):  # the SVD can't run on meta tensors; the shapes are those of kaiming
        spec = dataclasses.replace(spec, init="kaiming")
    if not quantized and method(spec.method).base_quantization:
        # a method that needs a quantized base (QA-LoRA) is counted as LoRA on the dense build: its
        # pooled inputs are smaller than LoRA's, so the activations are over- rather than underestimated
        spec = dataclasses.replace(spec, method="lora", options=None)
    with torch.device("meta"):  # the adapter's own tensors too
        add_adapter(model, spec, spec.name)
    mark_only_adapters_trainable(model)
    return model


def model_architecture(source: str):
    """The transformers config of a model source, read without loading weights."""
    from transformers import AutoConfig

    from loraforge.models.sources import ModelSourceError, default_gguf_path
    from loraforge.models.tiny import TINY_FAMILIES, tiny_model

    if source in TINY_FAMILIES:
        return tiny_model(source).config
    path = default_gguf_path() if source == "default" else os.path.expanduser(source)
    try:
        if str(path).endswith(".gguf"):
            return AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        if os.path.isfile(os.path.join(path, "config.json")):
            return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"model.source {source!r}: its configuration can't be read ({err})") from None
    raise ModelSourceError(f"model source {source!r}: no such model folder (with config.json) or .gguf file; use "
                           f"'default', a Hugging Face model folder, a .gguf file, or one of {sorted(TINY_FAMILIES)}")


def _gguf_weight_bytes(source: str) -> int:
    """``quantization.type: gguf`` keeps the file's tensors as stored: their bytes."""
    from loraforge.models.gguf_file import GGUFFile
    from loraforge.models.sources import default_gguf_path

    path = default_gguf_path() if source == "default" else os.path.expanduser(source)
    return sum(t.n_bytes for t in GGUFFile(path).tensors)


def _saved_bytes(model: nn.Module, tokens: int, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes autograd saves for backward in one forward of ``tokens`` tokens: (decoder, head + loss).

    Runs the meta model under ``FakeTensorMode`` (transformers then skips its data-dependent mask checks)
    with the attention swapped for a fused kernel's footprint (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.autograd.graph import saved_tensors_hooks

    model = model.to(dtype) if dtype != _float_dtype(model) else model
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    previous = model.config._attn_implementation
    model.config._attn_implementation = _register_fused_attention()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = [mode.from_tensor(t) for t in (*model.parameters(), *model.buffers())]  # alive: ids stay unique
            params = {t.untyped_storage()._cdata for t in fakes}
            ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
            with saved_tensors_hooks(pack, lambda tensor: tensor):
                hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # (1, T, H)
                decoder = sum(saved.values())
                logits = model.get_output_embeddings()(hidden[0])  # (T, V)
                summed_cross_entropy(logits.float(), ids[0])
    finally:
        model.config._attn_implementation = previous
    return decoder, sum(saved.values()) - decoder


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


@functools.cache
def _register_fused_attention() -> str:
    """Register (once) an attention function with the saved tensors of a fused causal kernel."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv

    def fused(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, heads, T, D)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal=True,
                                                                          scale=scaling)[0]
        return out.transpose(1, 2).contiguous(), None

    name = "loraforge_memory_estimate"
    AttentionInterface.register(name, fused)
    return name


def runtime_bytes(device: torch.device) -> int:
    """Memory the run needs before any model: see the module docstring."""
    return 0 if device.type == "cuda" else _cpu_runtime_bytes()


@functools.cache
def _cpu_runtime_bytes() -> int:
    code = ("import torch, loraforge.train.run, transformers.models.llama.modeling_llama; "
            "from loraforge.train.runlog import peak_memory_bytes; print(peak_memory_bytes(torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
