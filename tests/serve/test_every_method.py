"""The engine serves every adapter method of the registry in one mixed batch: each request's logits and
greedy tokens equal the adapter applied alone to the transformers model (PEFT's layers for the methods
PEFT has; ours loaded into transformers for QA-LoRA, whose PEFT form needs GPTQ/AWQ kernels)."""

import pytest
import torch
from peft import PeftModel

from loraforge.adapters import AdapterSpec, add_adapter, load_adapter, mark_only_adapters_trainable, save_adapter
from loraforge.adapters.adalora import AdaLoraOptions
from loraforge.models import tiny_model
from loraforge.quant.quantize_model import quantize_model
from loraforge.serve import Engine, Request

from .helpers import greedy, hf_logits, step_logits

DENSE = {
    "lora": dict(method="lora", r=4, alpha=8, init="none"),
    "dora": dict(method="dora", r=4, alpha=8, init="none"),
    "adalora": dict(method="adalora", alpha=8, init="none", options=AdaLoraOptions(init_r=4, target_r=2, total_step=10)),
    "vera": dict(method="vera", r=8, init="none"),
    "pissa": dict(method="lora", r=4, alpha=8, init="pissa"),
}
QUANTIZED = {"qalora": dict(method="qalora", r=4, alpha=8, init="none"), "lora-on-int4": DENSE["lora"]}
PROMPT = "Many methods, one batch"


def base(quantized: bool):
    model = tiny_model("tiny-llama")
    if quantized:
        quantize_model(model, type="int", bits=4, block_size=32, compute_dtype="fp32")
    return model.eval()


def trained_adapter(folder, fields, quantized, seed):
    """An adapter file whose every tensor moved off its init (a few SGD steps), as a training run leaves it."""
    model = base(quantized)
    spec = AdapterSpec(target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"], **fields)
    torch.manual_seed(seed)
    add_adapter(model, spec)
    mark_only_adapters_trainable(model)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_adapter(model, folder, spec)


def reference(folder, quantized):
    """The adapter alone on the transformers model: PEFT where PEFT has the method, else ours."""
    if quantized:
        model = base(True)
        load_adapter(model, folder)
        return model.eval()
    return PeftModel.from_pretrained(base(False), folder).eval()


@pytest.mark.parametrize("quantized, methods", [(False, DENSE), (True, QUANTIZED)], ids=["dense", "int4"])
def test_every_method_in_one_mixed_batch_equals_it_alone(quantized, methods, tokenizer, tmp_path):
    folders = {name: trained_adapter(tmp_path / name, fields, quantized, seed)
               for seed, (name, fields) in enumerate(methods.items())}
    engine = Engine(base(quantized), tokenizer, adapters=folders, pool_bytes=1 << 23)
    ids = tokenizer.encode(PROMPT)
    names = list(folders) + [None]
    ours = step_logits(engine, [(ids, name) for name in names])
    references = {name: reference(folder, quantized) for name, folder in folders.items()}
    for name, logits in zip(names, ours):
        expected = hf_logits(references[name] if name else base(quantized), ids)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4, msg=f"{name}")
        if name:
            assert not torch.allclose(logits, ours[-1], atol=1e-3), f"{name} must change the output"

    outputs = engine.generate([Request(PROMPT, greedy(max_tokens=8), adapter=name) for name in names])
    prompt = torch.tensor([ids])
    for name, out in zip(names, outputs):
        model = references[name] if name else base(quantized)
        tokens = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False, eos_token_id=None, pad_token_id=256)
        assert out.token_ids == tokens[0, len(ids):].tolist(), name
