"""``evaluate`` on tiny-llama, base and two PEFT-made adapters, against independent computations: perplexity and
multiple choice from transformers' forward of PEFT's merged models, exact/contains match, BLEU and ROUGE from a
greedy decode written out by hand, with both generation backends."""

import math

import pytest
import torch
import torch.nn.functional as F
from references import require

from loraforge.adapters import adapted_layers, load_adapter
from loraforge.data.formats import Conversation
from loraforge.data.readers import Record
from loraforge.data.tokenize import IGNORE_INDEX, tokenize_conversations
from loraforge.eval import EvalError, EvalOptions, InModel, Normalization, evaluate
from loraforge.eval.choices import to_questions
from loraforge.models import tiny_model

from .conftest import QUESTIONS, reference_model, save_peft_adapter

WORDS = ["cat", "dog", "sun", "sky", "red", "box", "pen", "cup"]
MAX_NEW = 10


def conversations(replies):
    return [Conversation([{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": r}], f"mem:{i}")
            for i, (w, r) in enumerate(zip(WORDS, replies))]


def hand_logprob(model, ids, labels) -> float:
    """Sum of log p(labels[t] | ids[:t]) over labelled t, from one transformers forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = F.log_softmax(logits[:-1], dim=-1)
    return sum(logprobs[t - 1, label].item() for t, label in enumerate(labels) if label != IGNORE_INDEX)


def hand_greedy(model, tokenizer, messages, max_new) -> str:
    """Greedy decoding written out: argmax of the last logits, until EOS or ``max_new`` tokens."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def references(adapter_dirs):
    return {"base": reference_model(), **{name: reference_model(path) for name, path in adapter_dirs.items()}}


def test_perplexity_equals_a_hand_computation_with_transformers(tokenizer, adapter_dirs, references):
    data = conversations([w.upper() + " now" for w in WORDS])
    result = evaluate(tiny_model("tiny-llama"), tokenizer, data, adapter_dirs,
                      EvalOptions(metrics=("perplexity",), batch_size=3))
    samples, _ = tokenize_conversations(tokenizer, data, "auto", 1024, train_on_prompt=False)
    assert result.labels == ["base", "qv", "mlp"]
    for label, model in references.items():
        total = sum(hand_logprob(model, s.input_ids, s.labels) for s in samples)
        count = sum(label != IGNORE_INDEX for s in samples for label in s.labels[1:])
        assert result.scores[label]["loss"] == pytest.approx(-total / count, rel=1e-5)
        assert result.scores[label]["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-5)
    assert len({round(result.scores[label]["loss"], 6) for label in result.labels}) == 3  # the adapters matter


def test_perplexity_of_the_base_equals_the_trainers_eval_loss(tokenizer):
    from loraforge.train.evaluate import eval_loss

    data = conversations([w.upper() for w in WORDS])
    model = tiny_model("tiny-llama")
    samples, _ = tokenize_conversations(tokenizer, data, "auto", 1024, train_on_prompt=False)
    expected = eval_loss(model, samples, 4, tokenizer.pad_token_id, torch.device("cpu"))
    result = evaluate(model, tokenizer, data, options=EvalOptions(metrics=("perplexity",)))
    assert result.scores["base"]["loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)


def test_multiple_choice_equals_log_likelihoods_from_transformers(tokenizer, adapter_dirs, references):
    questions = to_questions([Record(r, f"mem:{i}") for i, r in enumerate(QUESTIONS * 2)])
    result = evaluate(tiny_model("tiny-llama"), tokenizer, questions, adapter_dirs, EvalOptions(batch_size=5),
                      regression=questions[:5])
    for label, model in references.items():
        hits: dict[str, list[bool]] = {}
        for question in questions:
            context = tokenizer(f"Question: {question.question}\nAnswer:")["input_ids"]
            scores = []
            for choice in question.choices:
                continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
                scores.append(hand_logprob(model, context + continuation,
                                           [IGNORE_INDEX] * len(context) + continuation))
            hits.setdefault(question.subject, []).append(scores.index(max(scores)) == question.answer)
        expected = {s: sum(h) / len(h) for s, h in hits.items()}
        overall = sum(sum(h) for h in hits.values()) / len(questions)
        assert result.subjects[label] == pytest.approx({**expected, "overall": overall})
        assert result.scores[label]["multiple_choice"] == pytest.approx(overall)
        assert result.scores[label]["regression"] == pytest.approx(overall)  # the same questions, once
    for example in result.examples:  # items where the picks differ, with each model's chosen text
        assert len(set(example["answers"].values())) > 1


@pytest.mark.parametrize("backend", ["engine", "transformers"])
def test_generation_metrics_equal_a_hand_greedy_decode(tokenizer, adapter_dirs, references, backend):
    answers = {label: [hand_greedy(model, tokenizer, [{"role": "user", "content": f"say {w}"}], MAX_NEW)
                       for w in WORDS] for label, model in references.items()}
    base = answers["base"]
    # references: the base's answer (twice), the qv adapter's, a piece of the base's, the base's in capitals
    replies = [base[0], base[1], answers["qv"][2], answers["qv"][3], base[4][2:6], base[5][1:], base[6].upper(),
               "no such answer"]
    data = conversations(replies)
    normalize = Normalization(case=True)
    result = evaluate(tiny_model("tiny-llama"), tokenizer, data, adapter_dirs,
                      EvalOptions(metrics=("exact_match", "contains", "bleu", "rouge"), max_new_tokens=MAX_NEW,
                                  backend=backend, normalize=normalize, batch_size=3))
    assert result.backend == backend
    sacrebleu = require("sacrebleu")
    rouge_scorer = require("rouge_score.rouge_scorer").RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for label in references:
        assert result.answers[label] == answers[label]
        norm = [" ".join(a.casefold().split()) for a in answers[label]]
        refs = [" ".join(r.casefold().split()) for r in replies]
        scores = result.scores[label]
        assert scores["exact_match"] == pytest.approx(sum(a == r for a, r in zip(norm, refs)) / len(refs))
        assert scores["contains"] == pytest.approx(sum(r in a for a, r in zip(norm, refs)) / len(refs))
        assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(answers[label], [replies]).score)
        rouge = [rouge_scorer.score(r, a) for a, r in zip(answers[label], replies)]
        assert scores["rouge1"] == pytest.approx(sum(s["rouge1"].fmeasure for s in rouge) / len(rouge))
    assert result.scores["base"]["exact_match"] >= 3 / 8 and result.scores["base"]["contains"] >= 5 / 8
    differ = [i for i in range(len(WORDS)) if len({" ".join(answers[k][i].casefold().split()) for k in answers}) > 1]
    assert [e["origin"] for e in result.examples] == [f"mem:{i}" for i in differ][:10]


def test_the_model_is_given_back_as_it_came(tokenizer, adapter_dirs):
    model = tiny_model("tiny-llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(ids).logits
    evaluate(model, tokenizer, conversations(WORDS), adapter_dirs, EvalOptions(max_new_tokens=4))
    assert adapted_layers(model) == {}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_an_adapter_already_on_the_model_is_scored_in_place(tokenizer, adapter_dirs):
    model = tiny_model("tiny-llama")
    load_adapter(model, adapter_dirs["qv"], "trained")
    data = conversations(WORDS)
    options = EvalOptions(metrics=("perplexity", "exact_match"), max_new_tokens=6)
    in_place = evaluate(model, tokenizer, data, {"trained": InModel("trained")}, options)
    from_folder = evaluate(tiny_model("tiny-llama"), tokenizer, data, {"trained": adapter_dirs["qv"]}, options)
    assert in_place.backend == "engine+transformers"  # base on the engine; the in-memory adapter by generate
    assert in_place.answers == from_folder.answers
    for label in ("base", "trained"):
        assert in_place.scores[label] == pytest.approx(from_folder.scores[label], rel=1e-6)
    assert list(adapted_layers(model)["model.layers.0.self_attn.q_proj"].adapters) == ["trained"]


def test_a_quantized_base_gives_the_same_answers_on_the_engine_and_with_generate(tokenizer, adapter_dirs):
    from loraforge.config import ModelConfig, QuantizationConfig
    from loraforge.models.prepare import load_base

    config = ModelConfig(source="tiny-llama", quantization=QuantizationConfig(type="nf4", compute_dtype="fp32"))
    model, _ = load_base(config, torch.device("cpu"))
    data = conversations(WORDS)
    options = {"metrics": ("perplexity", "exact_match"), "max_new_tokens": MAX_NEW}
    engine = evaluate(model, tokenizer, data, adapter_dirs, EvalOptions(**options))
    generate = evaluate(model, tokenizer, data, adapter_dirs, EvalOptions(backend="transformers", **options))
    assert (engine.backend, generate.backend) == ("engine", "transformers")
    assert engine.answers == generate.answers
    samples, _ = tokenize_conversations(tokenizer, data, "auto", 1024, train_on_prompt=False)
    total = sum(hand_logprob(model, s.input_ids, s.labels) for s in samples)
    count = sum(label != IGNORE_INDEX for s in samples for label in s.labels[1:])
    assert engine.scores["base"]["loss"] == pytest.approx(-total / count, rel=1e-5)
    assert engine.answers["base"] != engine.answers["mlp"]


def test_metrics_must_fit_the_data(tokenizer):
    questions = to_questions([Record(r, f"mem:{i}") for i, r in enumerate(QUESTIONS)])
    model = tiny_model("tiny-llama")
    with pytest.raises(EvalError, match=r"metrics \['bleu'\] don't fit the data: it holds multiple-choice questions"):
        evaluate(model, tokenizer, questions, options=EvalOptions(metrics=("bleu",)))
    with pytest.raises(EvalError, match=r"metrics \['multiple_choice'\] don't fit the data: it holds conversations"):
        evaluate(model, tokenizer, conversations(WORDS), options=EvalOptions(metrics=("multiple_choice",)))
    with pytest.raises(EvalError, match=r"unknown metrics \['accuracy'\]; choose from \['perplexity'"):
        EvalOptions(metrics=("accuracy",))
    with pytest.raises(EvalError, match="backend 'vllm' is not one of"):
        EvalOptions(backend="vllm")
    with pytest.raises(EvalError, match="the adapter label 'base' is taken by the base model"):
        evaluate(model, tokenizer, questions, {"base": "somewhere"})


def test_an_adapter_for_another_base_is_refused_naming_it(tokenizer, tmp_path):
    from loraforge.adapters import AdapterFormatError

    other = save_peft_adapter(tmp_path / "wide", seed=0, model_overrides={"intermediate_size": 96}, r=4,
                              target_modules=["up_proj"])
    model = tiny_model("tiny-llama")
    with pytest.raises(AdapterFormatError, match=r"adapter 'wide' \(.*wide\) does not fit this base model "
                                                 r"\(tiny-llama\): .*up_proj.* has shape"):
        evaluate(model, tokenizer, conversations(WORDS), {"wide": other}, model_source="tiny-llama")
    assert adapted_layers(model) == {}


def test_a_model_the_engine_cannot_run_is_answered_by_generate(tokenizer, adapter_dirs, monkeypatch, caplog):
    from loraforge.serve import runner

    data = conversations(WORDS)
    options = EvalOptions(metrics=("exact_match",), max_new_tokens=6)
    on_engine = evaluate(tiny_model("tiny-llama"), tokenizer, data, adapter_dirs, options)
    monkeypatch.setattr(runner, "SUPPORTED_MODEL_TYPES", ("qwen2",))  # as if llama were another architecture
    fallback = evaluate(tiny_model("tiny-llama"), tokenizer, data, adapter_dirs, options)
    assert (on_engine.backend, fallback.backend) == ("engine", "transformers")
    assert fallback.answers == on_engine.answers
    assert "the serving engine can't run this model" in caplog.text
