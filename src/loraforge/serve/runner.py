"""Our own forward pass for Llama-family models (Llama, SmolLM, Qwen2, Mistral) over a paged KV cache,
and for the language model of Qwen2-VL / Qwen2.5-VL, whose prefills also run the vision tower.

One ``forward`` runs one engine step: the packed tokens of many sequences (whole prompts being
prefilled, and one new token for each decoding sequence) go through the layers together, with no
padding. Only attention looks at sequences one by one: each prefill attends within itself, and all
decodes attend, in one batched call, to their K/V gathered from the cache.

A vision-language model's step may carry images (``StepBatch.images``): the model's own vision tower
(``get_image_features``) turns each prefill's pixels into features that replace its image tokens'
embeddings, and every token's rotary angle comes from its three M-RoPE positions
(``StepBatch.mrope_positions``, see ``serve.vision``) as transformers recomposes them (``mrope_section``).

Weights are read from the loaded Hugging Face module. Projections are called as modules
(``proj(x)`` computes ``x @ W.T + b``), so a quantized linear (``loraforge.quant.QuantLinear``) works
wherever an ``nn.Linear`` does. With ``fuse=True``, where q/k/v (and gate/up) are plain ``nn.Linear``
modules, their weights are moved into one buffer per layer, the modules keeping views into it (no
extra memory), and each group runs as one GEMM (``FusedLinear``); each projection's LoRA update is
then added to its slice of the fused output. Off by default: on the CPU it measured 2-5% slower per
decode step (``benchmarks/serve_slora.py``, BENCHMARKS.md); a GPU may differ.

Quantized projections whose weights torch's int4 kernel takes (``quant.kernels``) are fused by default
(``fuse_quantized``, ``FusedQuantLinear``): on decode-size steps q/k/v and gate/up each run as one packed
kernel call, and o/down as one call each, past ``QuantLinear``'s per-call checks; the packed copy replaces
the ones the layers would build, so it costs no memory. Measured on the default model's Q4_1 file (bf16,
1 thread): 10-16% faster single-stream decode than the layers run one by one
(``benchmarks/serve_quantized.py``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.models.kind import is_vision_language
from loraforge.models.vision import VLM_MODEL_TYPES, vision_layout
from loraforge.native import DECODE_OPS
from loraforge.quant import kernels
from loraforge.quant.base import QuantLinear
from loraforge.serve.adapter_store import Adapter, TargetModule
from loraforge.serve.lora_ops import Segments, add_lora
from loraforge.serve.paged_kv import PagedKVCache
from loraforge.serve.vision import PromptVision

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
NATIVE_DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes of the native decode ops (``_native_ops``)."""
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""RoPE types whose frequencies don't depend on the sequence length, so they can be computed once."""


@dataclass
class StepBatch:
    """The tokens of one engine step, packed: ``T`` tokens from several sequences.

    Every token gets a KV slot (``slot_pages``/``slot_offsets``, ``(T,)``). A prefill sequence owns a
    contiguous token range and starts at position 0. Decode tokens are listed by ``decode_rows``
    ``(D,)``, with their block tables ``(D, max_blocks)`` and KV lengths including the new token ``(D,)``.
    ``logit_rows`` ``(S,)`` are the tokens whose next-token logits are wanted. Tokens of one adapter are
    contiguous runs (``segments``), ``adapters[slot]`` being the adapter of slot ``slot``.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_pages: torch.Tensor
    slot_offsets: torch.Tensor
    prefills: list[tuple[int, int]]
    decode_rows: torch.Tensor
    decode_tables: torch.Tensor
    decode_lens: torch.Tensor
    logit_rows: torch.Tensor
    segments: Segments | None = None
    adapters: list[Adapter] = field(default_factory=list)
    mrope_positions: torch.Tensor | None = None
    """``(3, T)`` M-RoPE positions when some sequence has images; else ``positions`` serve all three axes."""
    images: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """``(start, end, pixel_values, image_grid_thw)`` of each prefill token range that holds images."""
    extends: list[tuple[int, int, int, torch.Tensor]] = field(default_factory=list)
    """``(start, end, num_cached, block_table)`` of each prefill chunk that follows ``num_cached`` tokens
    already in the cache (a prefix-cache hit, or the earlier chunks of a chunked prefill): it attends
    to those and to itself. ``block_table`` ``(blocks,)`` covers its tokens up to ``end``."""


@dataclass(frozen=True)
class FusedLinear:
    """Several ``nn.Linear`` of one input run as one: ``weight`` ``(sum(sizes), in)`` holds theirs, stacked."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, modules: list[nn.Module]) -> FusedLinear | None:
        """Fuse ``modules`` in place (their weights and biases become views of the stacked ones), or None
        when they aren't all plain ``nn.Linear`` of one dtype and device, with biases on all or none."""
        if not all(type(m) is nn.Linear for m in modules):
            return None
        weights, biases = [m.weight for m in modules], [m.bias for m in modules]
        if len({(w.dtype, w.device) for w in weights}) != 1 or len({b is None for b in biases}) != 1:
            return None
        with torch.no_grad():
            weight = torch.cat([w.detach() for w in weights])
            bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        sizes = tuple(m.out_features for m in modules)
        for m, w, b in zip(modules, weight.split(sizes), bias.split(sizes) if bias is not None else [None] * len(modules)):
            m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
            if b is not None:
                m.bias = nn.Parameter(b, requires_grad=m.bias.requires_grad)
        return cls(weight, bias, sizes)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


@dataclass(frozen=True)
class FusedQuantLinear:
    """Several ``QuantLinear`` of one input run as one kernel call on decode-size steps (``kernels.FusedKernel``):
    our native kernel over the layers' own buffers up to ``packed.native_rows`` tokens, then torch's int4 kernel
    on one pack of them all, built on first use in place of the packed copies the layers would build for
    themselves, so no memory is added. Steps of more than ``max_rows`` tokens run the layers one by one (their
    tiled path, which packs nothing)."""

    packed: kernels.FusedKernel
    modules: tuple[QuantLinear, ...]
    bias: torch.Tensor | None
    sizes: tuple[int, ...]
    max_rows: int
    dtype: torch.dtype

    @classmethod
    def of(cls, modules: list[nn.Module]) -> FusedQuantLinear | None:
        """The fused form of ``modules``, or None unless they are all ``QuantLinear`` of one compute dtype whose
        weights the kernel takes alike (format family, group size), with biases on all or none."""
        if not all(isinstance(m, QuantLinear) for m in modules) or len({m.compute_dtype for m in modules}) != 1:
            return None
        dtype = modules[0].compute_dtype
        biases = [m.bias for m in modules]
        packed = kernels.fused_kernel([m.qweight for m in modules], dtype)
        if packed is None or len({b is None for b in biases}) != 1:
            return None
        bias = None if biases[0] is None else torch.cat(biases)
        return cls(packed, tuple(modules), bias, tuple(m.out_features for m in modules), packed.max_rows, dtype)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != self.dtype or x.numel() > self.max_rows * x.shape[-1]:
            return tuple(m(x) for m in self.modules)
        y = self.packed.mm(x.reshape(-1, x.shape[-1]))
        if self.bias is not None:
            y += self.bias
        y = y.view(*x.shape[:-1], -1)
        return (y,) if len(self.sizes) == 1 else y.split_with_sizes(self.sizes, dim=-1)


class _LayerModules(NamedTuple):
    """One decoder layer's modules, looked up once: a step would otherwise pay ~500 ``nn.Module`` attribute
    lookups (~1 us each)."""

    input_norm: nn.Module
    post_norm: nn.Module
    qkv: tuple[nn.Module, nn.Module, nn.Module]
    o: tuple[nn.Module]
    gate_up: tuple[nn.Module, nn.Module]
    down: tuple[nn.Module]
    act_fn: nn.Module

    @classmethod
    def of(cls, layer: nn.Module) -> _LayerModules:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(layer.input_layernorm, layer.post_attention_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj),
                   (attn.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,), mlp.act_fn)


class UnsupportedModelError(ValueError):
    """A model this runner can't run; the message names what it supports."""


class ModelRunner:
    """Llama-family forward over ``PagedKVCache``; see the module docstring.

    Raises ``UnsupportedModelError`` for other architectures or for RoPE types whose frequencies vary
    with sequence length (``dynamic``, ``longrope``).
    """

    def __init__(self, model: nn.Module, fuse: bool = False, fuse_quantized: bool = True):
        self.vision_model = model if is_vision_language(model) else None
        if self.vision_model is not None:
            prefix = vision_layout(model).language
            inner, config = model.get_submodule(prefix), model.config.text_config
            self.image_token_id = model.config.image_token_id
        else:
            config, prefix = model.config, "model"
            if config.model_type not in SUPPORTED_MODEL_TYPES:
                raise UnsupportedModelError(
                    f"model_type {config.model_type!r} is not supported by the serving engine; "
                    f"it runs {list(SUPPORTED_MODEL_TYPES)} (SmolLM is 'llama') and the vision-language "
                    f"models {list(VLM_MODEL_TYPES)}"
                )
            inner = model.model
        rotary = inner.rotary_emb
        self.mrope_section = getattr(rotary, "mrope_section", None)
        if rotary.rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rotary.rope_type!r} is not supported; the engine runs {list(STATIC_ROPE_TYPES)}"
            )
        self.model = model
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_positions = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        embed_tensor = next(itertools.chain(inner.embed_tokens.parameters(), inner.embed_tokens.buffers()))
        self.dtype = getattr(inner.embed_tokens, "dtype", embed_tensor.dtype)  # a QuantEmbedding's output dtype
        self.device = embed_tensor.device
        self.inv_freq = rotary.inv_freq.float()
        self.rope_scaling = float(rotary.attention_scaling)
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.layers = list(inner.layers)
        self.windows = [_sliding_window(config, i) for i in range(self.num_layers)]
        self.fused_qkv = [_fused([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], fuse,
                                 fuse_quantized) for layer in self.layers]
        self.fused_gate_up = [_fused([layer.mlp.gate_proj, layer.mlp.up_proj], fuse, fuse_quantized)
                              for layer in self.layers]
        # a quantized o/down projection alone: the same packed kernel call, without QuantLinear's per-call checks
        self.fused_o = [_fused([layer.self_attn.o_proj], False, fuse_quantized) for layer in self.layers]
        self.fused_down = [_fused([layer.mlp.down_proj], False, fuse_quantized) for layer in self.layers]
        self.modules = [_LayerModules.of(layer) for layer in self.layers]
        self.silu = config.hidden_act == "silu"  # the MLP's activation, as the native silu_mul computes it
        if self.device.type == "cpu":
            DECODE_OPS.library()  # built (first use on this machine, ~30 s) while the model loads, not on a request
        self.targets = {
            f"{prefix}.layers.{i}.{part}.{proj}": TargetModule(i, proj, module.in_features, module.out_features)
            for i, layer in enumerate(self.layers)
            for part, projs in (("self_attn", ATTENTION_PROJS), ("mlp", MLP_PROJS))
            for proj in projs
            for module in [getattr(getattr(layer, part), proj)]
        }

    @torch.inference_mode()
    def prompt_vision(self, prompt_ids: list[int], pixels: dict[str, torch.Tensor]) -> PromptVision:
        """The M-RoPE positions of a prompt whose image tokens hold ``pixels`` (``VisionProcessor.pixels``),
        computed by the model's own ``get_rope_index``, with the pixels moved to the model's device."""
        ids = torch.tensor([prompt_ids], device=self.device)
        grid = pixels["image_grid_thw"].to(self.device)
        positions, delta = self.vision_model.model.get_rope_index(ids, (ids == self.image_token_id).int(),
                                                                  image_grid_thw=grid)
        return PromptVision(pixels["pixel_values"].to(self.device), grid, positions[:, 0], int(delta))

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: PagedKVCache) -> torch.Tensor:
        """Run one step, writing every token's K/V to the cache; returns float32 logits ``(S, vocab)``."""
        h = self.embed(batch.input_ids)  # (T, hidden)
        ops = _native_ops(h)
        if batch.images:
            self._put_image_features(h, batch)
        cos, sin = self._rope(batch.positions if batch.mrope_positions is None else batch.mrope_positions)
        signed_sin = _signed_sin(sin)  # cos, signed_sin (T, hd): shared by every layer's q and k
        decode_masks: dict[int | None, torch.Tensor] = {}
        # one sequence decoding alone (single-stream serving): its keys are sliced to its length, no mask
        single_len = int(batch.decode_lens[0]) if len(batch.decode_rows) == 1 == len(batch.input_ids) else None
        # decodes only, with the native ops: each layer's RoPE, KV write and attention are one native call
        decode_step = ops is not None and len(batch.decode_rows) == len(batch.input_ids) and kv.blocks.dtype == h.dtype
        delta = None  # the last layer's MLP output, added to h together with the next norm
        for i, m in enumerate(self.modules):
            h, x = _add_rms_norm(h, delta, m.input_norm, ops)
            q, k, v = self._projs(self.fused_qkv[i], m.qkv, x, batch, i, ATTENTION_PROJS)
            if decode_step:
                o = ops.decode_attention_step(q, k, v, cos, signed_sin, kv.blocks, i, batch.slot_pages,
                                              batch.slot_offsets, batch.decode_tables, batch.decode_lens,
                                              self.windows[i] or 0)
            else:
                o = self._attention_layer(i, q, k, v, cos, signed_sin, batch, kv, decode_masks, single_len, ops)
            [o] = self._projs(self.fused_o[i], m.o, o, batch, i, ("o_proj",))
            h, x = _add_rms_norm(h, o, m.post_norm, ops)
            gate, up = self._projs(self.fused_gate_up[i], m.gate_up, x, batch, i, MLP_PROJS)
            act = ops.silu_mul(gate, up) if ops is not None and self.silu else m.act_fn(gate) * up
            [delta] = self._projs(self.fused_down[i], m.down, act, batch, i, ("down_proj",))
        last = (h + delta).index_select(0, batch.logit_rows)
        return self.lm_head(_add_rms_norm(last, None, self.norm, ops)[1]).float()

    def _attention_layer(self, layer: int, q, k, v, cos, signed_sin, batch: StepBatch, kv: PagedKVCache,
                         decode_masks: dict, single_len: int | None, ops) -> torch.Tensor:
        """RoPE on ``q`` ``(T, heads·hd)`` and ``k`` ``(T, kv_heads·hd)``, their K/V written to the cache, and the
        attention output ``(T, heads·hd)`` (``decode_masks`` caches the step's masks by window)."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k, v = (t.view(-1, self.num_kv_heads, self.head_dim) for t in (k, v))
        q, k = _apply_rope(q, cos, signed_sin, ops), _apply_rope(k, cos, signed_sin, ops)
        kv.write(layer, k, v, batch.slot_pages, batch.slot_offsets, ops)
        window = self.windows[layer]
        if window not in decode_masks and batch.decode_rows.numel() and single_len is None and ops is None:
            decode_masks[window] = _decode_mask(batch.decode_lens, batch.decode_tables.shape[1] * kv.block_size, window)
        o = self._attention(layer, q, k, v, batch, kv, decode_masks.get(window), single_len, ops)
        return o.reshape(-1, self.num_heads * self.head_dim)

    def _proj(self, module: nn.Module, x: torch.Tensor, batch: StepBatch, layer: int, proj: str) -> torch.Tensor:
        return self._add_lora(module(x), module, x, batch, layer, proj)

    def _projs(self, fused: FusedLinear | FusedQuantLinear | None, modules, x, batch: StepBatch, layer: int, names) -> tuple[torch.Tensor, ...]:
        """The outputs of ``modules`` (all of one input ``x``), by one fused GEMM when ``fused`` is given."""
        if fused is None:
            return tuple(self._proj(module, x, batch, layer, name) for module, name in zip(modules, names))
        if batch.segments is None:  # no adapter in this step
            return fused(x)
        return tuple(self._add_lora(y, module, x, batch, layer, name) for y, module, name in zip(fused(x), modules, names))

    def _add_lora(self, y: torch.Tensor, module: nn.Module, x: torch.Tensor, batch: StepBatch, layer: int, proj: str) -> torch.Tensor:
        """Add the step's adapters' updates on ``proj`` to its output ``y`` (in place; ``y`` may be a view)."""
        if batch.segments is not None:
            weights = [adapter.views.get((layer, proj)) for adapter in batch.adapters]
            if any(w is not None for w in weights):
                add_lora(y, x, batch.segments, weights, module.bias)
        return y

    def _put_image_features(self, h: torch.Tensor, batch: StepBatch) -> None:
        """Replace the image tokens' embeddings in ``h`` ``(T, hidden)`` by the vision tower's features."""
        for start, end, pixel_values, grid in batch.images:
            features = self.vision_model.model.get_image_features(pixel_values, grid).pooler_output
            rows = start + (batch.input_ids[start:end] == self.image_token_id).nonzero()[:, 0]
            h[rows] = torch.cat(features).to(h.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``(T, head_dim)`` for positions ``(T,)``, or M-RoPE positions ``(3, T)`` recomposed by
        ``mrope_section``, computed as transformers does (float32, then cast)."""
        if self.mrope_section is not None:
            positions = positions.expand(3, -1) if positions.dim() == 1 else positions
            freqs = positions[..., None].float() * self.inv_freq  # (3, T, hd/2)
            parts = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)  # (T, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)

    def _attention(self, layer, q, k, v, batch: StepBatch, kv: PagedKVCache, decode_mask,
                   single_len: int | None = None, ops=None) -> torch.Tensor:
        """Attention output ``(T, heads, head_dim)`` for q ``(T, heads, hd)`` and this step's k, v ``(T, kv_heads, hd)``.

        Decoding tokens attend to the cache through ``ops.paged_decode_attention`` (the native ops, see
        ``_native_ops``) when given, reading their block tables in place (a step of decodes only takes
        ``ops.decode_attention_step`` instead, in ``forward``); else by torch's attention over gathered K/V. There,
        ``single_len``, the KV length when the step is one decoding sequence alone, has its keys sliced to that
        length (and to the layer's window) instead of masked: no mask to build, no padded keys.
        """
        if single_len is not None:
            window = self.windows[layer]
            first = 0 if window is None else max(0, single_len - window)
            keys, values = (t[:, :, first:single_len] for t in kv.gather(layer, batch.decode_tables))
            return F.scaled_dot_product_attention(q[:, :, None, :], keys, values, enable_gqa=True)[:, :, 0]
        if len(batch.decode_rows) == len(q):  # decodes only (most steps): no scatter into a shared output
            keys, values = kv.gather(layer, batch.decode_tables)
            o = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=decode_mask, enable_gqa=True)
            return o[:, :, 0]
        out = torch.empty_like(q)
        window = self.windows[layer]
        for start, end in batch.prefills:
            qi, ki, vi = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, L, hd)
            n = end - start
            if window is None or n <= window:
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
            else:
                pos = torch.arange(n, device=q.device)
                mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=True)
            out[start:end] = o[0].transpose(0, 1)
        for start, end, cached, table in batch.extends:
            keys, values = kv.gather(layer, table[None])  # (1, kv_heads, blocks * block_size, hd): this step's K/V included
            total = cached + end - start
            qpos = torch.arange(cached, total, device=q.device)[:, None]
            kpos = torch.arange(total, device=q.device)[None, :]
            mask = kpos <= qpos if window is None else (kpos <= qpos) & (kpos > qpos - window)
            qi = q[start:end].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qi, keys[:, :, :total], values[:, :, :total], attn_mask=mask, enable_gqa=True)
            out[start:end] = o[0].transpose(0, 1)
        if batch.decode_rows.numel() and ops is not None:
            out[batch.decode_rows] = ops.paged_decode_attention(q.index_select(0, batch.decode_rows), kv.blocks, layer,
                                                                batch.decode_tables, batch.decode_lens, window or 0)
        elif batch.decode_rows.numel():
            keys, values = kv.gather(layer, batch.decode_tables)  # (D, kv_heads, L, hd)
            qd = q.index_select(0, batch.decode_rows)[:, :, None, :]  # (D, heads, 1, hd)
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=decode_mask, enable_gqa=True)
            out[batch.decode_rows] = o[:, :, 0]
        return out


def _fused(modules: list[nn.Module], fuse: bool, fuse_quantized: bool) -> FusedLinear | FusedQuantLinear | None:
    """The fused form of a projection group (see the module docstring), or None to run them one by one."""
    if fuse_quantized and isinstance(modules[0], QuantLinear):
        return FusedQuantLinear.of(modules)
    return FusedLinear.of(modules) if fuse else None


def _sliding_window(config, layer: int) -> int | None:
    """The layer's attention window, following transformers: per-layer ``layer_types`` when present."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer] == "sliding_attention" else None
    return window


def _decode_mask(lens: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """``(D, 1, 1, width)`` True where a decode token (at position ``len - 1``) may attend."""
    keys = torch.arange(width, device=lens.device)[None, :]
    mask = keys < lens[:, None]
    if window is not None:
        mask &= keys > (lens[:, None] - 1 - window)
    return mask[:, None, None, :]


def _native_ops(h: torch.Tensor):
    """The native decode ops (``native/decode_ops.cpp``: fused norm, RoPE, KV write, paged decode attention) for a step
    whose hidden states are ``h``, or None to run torch's ops: off the CPU, in dtypes they don't take, or where the
    library could not be built."""
    if h.device.type != "cpu" or h.dtype not in NATIVE_DTYPES:
        return None
    return DECODE_OPS.library()


def _add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module, ops) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h + delta, norm(h + delta))`` (``h`` itself when ``delta`` is None), the norm being transformers' Llama
    RMSNorm (float32 statistics, weight applied in the input dtype): one native call, or torch's own ``rms_norm``,
    which computes the same float32 steps in one call."""
    if ops is not None and norm.weight.dtype == h.dtype:
        out = ops.rms_norm(h, delta, norm.weight, norm.variance_epsilon)
        return (h, out[0]) if delta is None else (out[0], out[1])
    if delta is not None:
        h = h + delta
    return h, norm.weight * F.rms_norm(h.float(), h.shape[-1:], eps=norm.variance_epsilon).to(h.dtype)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` ``(T, hd)`` with its first half negated, so that rotate-half is a roll (``_apply_rope``)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, ops) -> torch.Tensor:
    """Rotate ``x`` ``(T, heads, hd)`` by per-token ``cos``/``signed_sin`` ``(T, hd)`` (rotate-half convention:
    ``x·cos + cat(−x₂, x₁)·sin``, the very same products, with the sign moved into ``signed_sin``); the native op
    rotates ``x`` in place."""
    if ops is not None and x.dtype == cos.dtype:
        ops.rope_(x, cos, signed_sin)
        return x
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin[:, None]
