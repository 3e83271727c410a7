"""Tiny random-initialised Llama-family models and a byte-level tokenizer, built in-process for tests.

Source strings: ``tiny-llama``, ``tiny-qwen2``, ``tiny-mistral``. Every model has hidden size 64,
2 layers, 4 attention heads and 2 KV heads, and a vocabulary of 256 bytes plus the ChatML special
tokens, so that the same tokenizer serves all three.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

TINY_FAMILIES = {"tiny-llama": LlamaConfig, "tiny-qwen2": Qwen2Config, "tiny-mistral": MistralConfig}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0..255 are bytes (GPT-2 byte-to-unicode map), then specials.

    It has a ChatML chat template, ``<|im_end|>`` as EOS and ``<|endoftext|>`` as padding.
    """
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars, key=_byte_of))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    code = ord(char)
    if 33 <= code <= 126 or 161 <= code <= 172 or 174 <= code <= 255:
        return code
    shifted = sorted(b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255))
    return shifted[code - 256]


def tiny_model(family: str = "tiny-llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-initialised causal LM of the given family; ``overrides`` change config fields."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model {family!r}; choose one of {sorted(TINY_FAMILIES)}")
    fields = dict(
        vocab_size=256 + len(SPECIAL_TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=256,
        eos_token_id=258,
        bos_token_id=None,
    )
    fields.update(overrides)
    config = TINY_FAMILIES[family](**fields)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()
