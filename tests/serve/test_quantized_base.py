"""Serving a quantized base (``serve``/``chat`` ``--quantization``): the engine's greedy tokens equal greedy
generation by the same quantized model through its transformers forward (our ``QuantLinear`` layers), a
GGUF file's blocks are kept and answer as llama.cpp answers from the same file, a QA-LoRA run exported to
GGUF serves what the base plus its unmerged adapter serves, and ``/metrics`` reports the base's bytes."""

import pytest
import torch
from export.test_gguf_llama_cpp import RELATIVE_ERROR
from gguf_helpers import agreement, llama_cpp_logits, model_on
from references import require

from loraforge.adapters import AdapterSpec, add_adapter, save_adapter
from loraforge.cli.main import main
from loraforge.config import Config, save_config
from loraforge.export.gguf_writer import write_gguf
from loraforge.models import ModelSourceError, tiny_tokenizer
from loraforge.quant.base import QuantEmbedding, QuantLinear
from loraforge.quant.summary import quant_summary
from loraforge.serve import Engine, Request
from loraforge.serve.api import create_app
from loraforge.serve.base_model import load_serving_base, serving_model_config

from .helpers import ServerThread, greedy, hf_logits, metric, step_logits

PROMPT = "Four bits a weight, served as they are"
NEW_TOKENS = 12
INIT_RANGE = 0.1
"""Wider than transformers' 0.02, at which a tiny model's attention is nearly uniform and wrong q/k rows barely
show in the logits (tests/export/test_gguf_llama_cpp.py)."""


def formats(model) -> set[str]:
    """Formats of the decoder's quantized linears (the output head is checked on its own: ``head_kept``)."""
    return {m.qweight.format for m in model.modules() if isinstance(m, QuantLinear) and m is not model.lm_head}


def head_kept(model, tied: bool) -> bool:
    """Whether the served model multiplies by the file's own Q8_0 head blocks, a tied embedding looking up
    rows of the very same weight (stored once)."""
    head, embedding = model.lm_head, model.model.embed_tokens
    if not (isinstance(head, QuantLinear) and head.qweight.format == "q8_0"):
        return False
    return (isinstance(embedding, QuantEmbedding) and embedding.qweight is head.qweight) if tied else True


def served_tokens(engine, ids, adapter=None) -> list[int]:
    [out] = engine.generate([Request(ids, greedy(max_tokens=NEW_TOKENS), adapter=adapter)])
    return out.token_ids


def generated_tokens(model, ids) -> list[int]:
    """Greedy tokens of transformers' ``generate`` over ``model`` (with its quantized layers)."""
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=256)
    return out[0, len(ids):].tolist()


def assert_greedy_agrees(model, ids, ours: list[int], expected: list[int]) -> None:
    """``ours`` are ``expected`` (transformers' greedy tokens), or they part where transformers' own logits hold a
    tie at the model's precision: our token's logit within 2 units in the last place of the largest. In bf16
    the native decode attention (``native/decode_ops.cpp``) sums in another order than torch's SDPA kernel,
    which moves 1 in ~70 of its outputs by one bf16 unit (measured), enough to pick the other of two tied
    logits; in fp32 the same order costs ~1e-7 and the tokens must be equal."""
    if ours == expected:
        return
    step = next(i for i, (a, b) in enumerate(zip(ours, expected)) if a != b)
    with torch.no_grad():
        row = model(torch.tensor([ids + expected[:step]])).logits[0, -1]
    ulp = torch.finfo(row.dtype).eps * 2.0 ** (torch.frexp(row.abs().max().float()).exponent.item() - 1)
    assert row.dtype == torch.bfloat16 and row.max() - row[ours[step]] <= 2 * ulp, (step, ours[step], expected[step])


def gguf_file(path, base: str, tied: bool = False):
    """A tiny Llama written as a GGUF whose decoder linears are ``base`` blocks (Q8_0 embedding and head; with
    ``tied``, one Q8_0 ``token_embd`` serves as both, as in the default model)."""
    write_gguf(model_on(base, initializer_range=INIT_RANGE, tie_word_embeddings=tied), tiny_tokenizer(), path, "auto")
    return path


@pytest.mark.parametrize("bf16_units", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("source, quantization, expected", [
    ("default", "auto", "gguf"), ("some/model.gguf", "auto", "gguf"), ("tiny-llama", "auto", None),
    ("default", "none", None), ("tiny-llama", "nf4", "nf4"), ("tiny-llama", "int4", "int"),
    ("default", "gguf", "gguf"),
])
def test_the_quantization_word_becomes_the_model_config(source, quantization, expected, bf16_units, monkeypatch):
    """auto keeps a GGUF's blocks only where the CPU has bf16 units: in fp32 the low-bit path is slower than dense."""
    monkeypatch.setattr("loraforge.quant.quantize_model.bf16_supported", lambda device: bf16_units)
    config = serving_model_config(source, quantization, torch.device("cpu"))
    assert config.source == source
    if quantization == "auto" and not bf16_units:
        expected = None
    assert (config.quantization.type if config.quantization else None) == expected
    if config.quantization is not None:  # bf16 where the CPU has bf16 units (torch's int4 kernel is fast there)
        assert config.quantization.compute_dtype == ("bf16" if bf16_units else "fp32")


def test_bad_quantization_words_are_refused_with_the_choices(capsys):
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        serving_model_config("tiny-llama", "gguf")
    assert main(["chat", "--model", "tiny-llama", "--quantization", "q3", "--prompt", "x"]) == 2
    assert "--quantization 'q3' is not one of auto, none, gguf, nf4" in capsys.readouterr().err


@pytest.mark.parametrize("quantization, fmt", [("nf4", "nf4"), ("fp4", "fp4"), ("int4", "int4"), ("int8", "int8")])
def test_a_base_quantized_on_load_serves_its_own_greedy_tokens(quantization, fmt, tokenizer):
    model, _ = load_serving_base("tiny-llama", quantization)
    assert formats(model) == {fmt}
    ids = tokenizer.encode(PROMPT)
    expected_logits, expected_tokens = hf_logits(model, ids), generated_tokens(model, ids)
    engine = Engine(model, tokenizer, pool_bytes=1 << 23)
    [logits] = step_logits(engine, [(ids, None)])
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    assert served_tokens(engine, ids) == expected_tokens


@pytest.mark.parametrize("tied", [False, True], ids=["head", "tied"])
@pytest.mark.parametrize("bf16_units", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("base", ["q4_1", "q8_0", "q4_0"])
def test_a_gguf_keeps_its_blocks_and_serves_what_it_generates_and_what_llama_cpp_computes(base, bf16_units, tied,
                                                                                           tmp_path, monkeypatch):
    """On the compute path of a CPU without bf16 units (fp32) and with them (bf16, the model held in bf16); with
    an output head of its own, and tied to the embedding (the default model's layout)."""
    monkeypatch.setattr("loraforge.quant.quantize_model.bf16_supported", lambda device: bf16_units)
    path = gguf_file(tmp_path / "m.gguf", base, tied)
    model, tokenizer = load_serving_base(str(path), "gguf")
    assert formats(model) == {base} and head_kept(model, tied)
    assert model.model.embed_tokens(torch.tensor([3])).dtype == (torch.bfloat16 if bf16_units else torch.float32)
    ids = tokenizer.encode(PROMPT)
    ours = served_tokens(Engine(model, tokenizer, pool_bytes=1 << 23), ids)
    assert_greedy_agrees(model, ids, ours, generated_tokens(model, ids))
    # llama.cpp over the same file and the served tokens. It rounds each quantized matmul's input to 8 bits, so
    # its logits agree within the export test's bound (RELATIVE_ERROR, reasoned there), and it picks each served
    # token too, unless its best two tokens lie within twice that bound of each other (measured here: 1 of 12
    # Q4_1 tokens, where llama.cpp's margin was 0.027 against a largest logit of 2.6).
    sequence = ids + ours
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float()
    theirs = llama_cpp_logits(path, sequence)
    bound = RELATIVE_ERROR[base if base != "q4_0" else "q4_1"] * logits.abs().max().item()
    corr, max_diff = agreement(logits, theirs)
    assert corr >= 0.9998 and max_diff <= bound, (corr, max_diff)
    for step, token in enumerate(ours):
        row = theirs[len(ids) + step - 1]
        best, second = row.topk(2).values.tolist()
        assert row.argmax().item() == token or best - second <= 2 * bound, (step, token, row.argmax().item())


@pytest.mark.parametrize("quantization", ["gguf", "int4"])
def test_metrics_report_the_bytes_of_the_quantized_base(quantization, tokenizer, tmp_path):
    source = str(gguf_file(tmp_path / "m.gguf", "q4_1")) if quantization == "gguf" else "tiny-llama"
    dense, _ = load_serving_base(source, "none")
    model, model_tokenizer = load_serving_base(source, quantization)
    summary = quant_summary(model)
    engine = Engine(model, model_tokenizer, pool_bytes=1 << 23)
    with ServerThread(create_app(engine, "base")) as server:
        assert metric(server.url, "loraforge_base_model_bytes") == summary["total_bytes"]
        quantized = metric(server.url, "loraforge_base_quantized_bytes")
    linears = sum(m.weight.numel() for m in dense.modules() if isinstance(m, torch.nn.Linear) and m is not dense.lm_head)
    head = dense.lm_head.weight.numel() if quantization == "gguf" else 0  # the GGUF's Q8_0 head is kept: 8.5 bits
    head_bytes = head * 34 // 32
    assert quantized == summary["quantized_bytes"]
    assert 4 * linears / 8 < quantized - head_bytes < 4 * linears / 6  # 4-5.3 bits
    assert summary["total_bytes"] < quant_summary(dense)["total_bytes"]


def test_a_qalora_run_exported_to_gguf_serves_what_the_base_and_its_adapter_serve(tokenizer, tmp_path, monkeypatch):
    """train on a Q4_1 GGUF with QA-LoRA -> ``export --run --format gguf`` -> ``serve --model merged.gguf``: the
    served tokens equal those of the base GGUF served with the unmerged adapter. Only QA-LoRA's fold of the
    group offsets into fp16 separates the two, far below the logit gaps greedy decoding turns on. Served in
    fp32 on any CPU and with exact products (no int8 activations: ``kernels.KERNEL``), so that neither bf16 nor
    8-bit activations can blur what the export changed."""
    monkeypatch.setattr("loraforge.quant.quantize_model.bf16_supported", lambda device: False)
    monkeypatch.setattr("loraforge.quant.kernels.KERNEL", "torch")
    base = gguf_file(tmp_path / "base.gguf", "q4_1")
    config = Config.from_dict({"model": {"source": str(base), "quantization": {"type": "gguf", "compute_dtype": "fp32"}},
                               "adapter": {"method": "qalora", "r": 4, "alpha": 8}}, check_files=False)
    run = tmp_path / "run"
    model, _ = load_serving_base(str(base), "gguf")
    torch.manual_seed(0)
    spec = AdapterSpec(method="qalora", r=4, alpha=8, init="none")
    add_adapter(model, spec)
    save_adapter(model, run / "adapter", spec)
    save_config(config, run / "config.yaml")
    merged = tmp_path / "merged.gguf"
    assert main(["export", "--run", str(run), "--format", "gguf", "--out", str(merged), "--device", "cpu"]) == 0

    served, served_tokenizer = load_serving_base(str(merged), "gguf")
    assert formats(served) == {"q4_1"}
    ids = served_tokenizer.encode(PROMPT)
    merged_engine = Engine(served, served_tokenizer, pool_bytes=1 << 23)
    base_model, base_tokenizer = load_serving_base(str(base), "gguf")
    unmerged_engine = Engine(base_model, base_tokenizer, adapters={"qa": run / "adapter"}, pool_bytes=1 << 23)
    [from_merged] = step_logits(merged_engine, [(ids, None)])
    from_adapter, from_base = step_logits(unmerged_engine, [(ids, "qa"), (ids, None)])
    assert (from_adapter - from_base).abs().max() > 10 * (from_merged - from_adapter).abs().max(), "adapter too weak"
    # The offsets' fp16 rounding (2**-11 relative) moves the logits by 2.6e-3 of the largest (measured); a wrong
    # fold (a lost adapter, offsets of the wrong group) moves them as much as the adapter does, 10x and more.
    torch.testing.assert_close(from_merged, from_adapter, atol=1e-2 * from_adapter.abs().max().item(), rtol=0)
    assert served_tokens(merged_engine, ids) == served_tokens(unmerged_engine, ids, adapter="qa")


def test_chat_with_a_quantized_base_answers_as_its_model_generates(tokenizer, capsys):
    from loraforge.data.tokenize import prompt_ids

    model, _ = load_serving_base("tiny-llama", "int4")
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "hi"}], "auto")
    expected = tokenizer.decode(generated_tokens(model, ids)[:8], skip_special_tokens=True).strip()
    assert main(["chat", "--model", "tiny-llama", "--quantization", "int4", "--prompt", "hi", "--max-new-tokens", "8",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.parametrize("bf16_units", [False, True], ids=["fp32", "bf16"])
def test_a_tied_q8_0_embedding_looks_up_the_files_own_rows(bf16_units, tmp_path, monkeypatch):
    """The served embedding (``QuantEmbedding``) returns gguf-py's dequantization of ``token_embd``'s rows, exactly
    (then rounded to bf16 on the bf16 path), and the head multiplies by the same values."""
    gguf = require("gguf")
    monkeypatch.setattr("loraforge.quant.quantize_model.bf16_supported", lambda device: bf16_units)
    path = gguf_file(tmp_path / "m.gguf", "q4_1", tied=True)
    model, _ = load_serving_base(str(path), "gguf")
    [tensor] = [t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight"]
    table = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())  # (vocab, hidden) fp32
    dtype = torch.bfloat16 if bf16_units else torch.float32
    ids = torch.tensor([[5, 0, 255, 5], [17, 3, 2, 1]])
    assert torch.equal(model.model.embed_tokens(ids), table[ids].to(dtype))
    hidden = torch.randn(2, table.shape[1]).to(dtype)
    expected = hidden.double() @ table.double().T
    tolerance = (1e-5 if dtype == torch.float32 else 2e-2) * expected.abs().max().item()
    assert (model.lm_head(hidden).double() - expected).abs().max() <= tolerance
