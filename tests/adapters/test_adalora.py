"""AdaLoRA against PEFT 0.21's AdaLoRA: forward, penalty, allocator, saved files; plus fold, resume and options."""

import copy
import io
import json

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from loraforge.adapters.adalora import TENSORS, AdaLoraAdapter, AdaLoraHook, AdaLoraOptions
from loraforge.adapters.inject import _wrap, select_targets
from loraforge.adapters.model import adapted_layers, mark_only_adapters_trainable
from loraforge.adapters.spec import AdapterError, AdapterSpec
from loraforge.config.validate import build
from loraforge.models import tiny_model
from loraforge.quant.blockwise4bit import Blockwise4bitWeight
from loraforge.quant.base import QuantLinear

PREFIX = "base_model.model."
OPTIONS = AdaLoraOptions(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10)
ALPHA = 16.0
TARGETS = ["q_proj", "v_proj"]
STEPS = 12  # past total_step, so the fixed final allocation is exercised too


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def ours(init="kaiming", options=OPTIONS):
    """A tiny llama with our AdaLoRA on q_proj and v_proj, adapters trainable."""
    model = tiny_model("tiny-llama")
    for path in select_targets(model, AdapterSpec(target_modules=TARGETS)):
        layer = _wrap(model, path)
        layer.adapters["default"] = AdaLoraAdapter(layer.base_layer, options.init_r, ALPHA, 0.0, init, options)
        layer.active.append("default")
    mark_only_adapters_trainable(model)
    return model


def peft(init_lora_weights=True, options=OPTIONS):
    fields = {k: getattr(options, k) for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step")}
    config = AdaLoraConfig(**fields, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=init_lora_weights,
                            task_type="CAUSAL_LM")  # without a task type PEFT skips the penalty
    return get_peft_model(tiny_model("tiny-llama"), config)


def peft_layer(pm, path):
    return pm.base_model.model.get_submodule(path)


def copy_from_peft(model, pm):
    for path, layer in adapted_layers(model).items():
        layer.adapters["default"].load_peft_tensors({n: getattr(peft_layer(pm, path), n)["default"] for n in TENSORS})


def train_step(model, hook, optimizer, ids, step):
    loss = model(input_ids=ids, labels=ids).loss + hook.loss()
    loss.backward()
    optimizer.step()
    hook.after_optimizer_step(step)
    optimizer.zero_grad()
    return loss.detach()


def adam(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def test_forward_matches_peft(ids):
    pm, model = peft(init_lora_weights=False), ours()
    copy_from_peft(model, pm)
    with torch.no_grad():
        base = tiny_model("tiny-llama")(input_ids=ids).logits
        expected = pm(input_ids=ids).logits
        assert not torch.allclose(expected, base, atol=1e-3)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-6)


def test_orth_penalty_matches_peft(ids):
    pm, model = peft(init_lora_weights=False), ours()
    copy_from_peft(model, pm)
    hook = AdaLoraHook(model, "default", OPTIONS)
    penalty = hook.loss()
    assert penalty > 1.0
    total = model(input_ids=ids, labels=ids).loss + penalty
    torch.testing.assert_close(total, pm(input_ids=ids, labels=ids).loss, rtol=0, atol=1e-5)


def test_default_init_is_identity_and_peft_like(ids):
    model = ours()
    adapter = next(iter(adapted_layers(model).values())).adapters["default"]
    assert adapter.lora_E.abs().sum() == 0 and 0.015 < adapter.lora_A.std() < 0.025
    assert float(adapter.ranknum) == 6 and "ranknum" not in dict(adapter.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model("tiny-llama")(input_ids=ids).logits)


@pytest.mark.parametrize("options", [OPTIONS, AdaLoraOptions(6, 2, tinit=1, tfinal=3, deltaT=3, total_step=12)])
def test_allocator_matches_peft_step_by_step(options, ids, tmp_path):
    pm, model = peft(options=options), ours(options=options)
    copy_from_peft(model, pm)
    hook = AdaLoraHook(model, "default", options)
    peft_opt, our_opt = adam(pm), adam(model)
    allocator = pm.base_model.rankallocator
    for step in range(options.total_step + 2):
        peft_loss = pm(input_ids=ids, labels=ids).loss
        peft_loss.backward()
        peft_opt.step()
        pm.base_model.update_and_allocate(step)
        peft_opt.zero_grad()
        torch.testing.assert_close(train_step(model, hook, our_opt, ids, step), peft_loss.detach(), rtol=0, atol=1e-6)

        assert hook.budget == allocator.budget_schedule(step)[0], step
        pattern = pm.peft_config["default"].rank_pattern or {}
        assert hook.rank_pattern() == {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()}, step
        assert hook.exp_avg_ipt.keys() == {k.removesuffix(".default") for k in allocator.exp_avg_ipt}
        for ours_, theirs in ((hook.exp_avg_ipt, allocator.exp_avg_ipt), (hook.exp_avg_unc, allocator.exp_avg_unc)):
            for key, ema in ours_.items():
                torch.testing.assert_close(ema, theirs[f"{key}.default"], rtol=1e-5, atol=1e-12)
        # 1e-4: after a dozen Adam steps an fp32 GEMM's last-bit differences (MKL's results depend on buffer
        # alignment, so on what ran before in the process) reach ~7e-5 of an entry; a wrong update is off by far more
        for path, layer in adapted_layers(model).items():
            torch.testing.assert_close(layer.adapters["default"].lora_E, peft_layer(pm, path).lora_E["default"],
                                       rtol=1e-4, atol=1e-7)
    masks = hook.rank_pattern()
    assert sum(map(sum, masks.values())) == hook.target_budget == 2 * len(masks)
    assert any(0 < sum(m) < 6 for m in masks.values())

    # The final files: PEFT drops pruned rows on save; finish() does the same in place.
    pm.save_pretrained(tmp_path)
    hook.finish()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    mine = {f"{PREFIX}{path}.{n}": t for path, layer in adapted_layers(model).items()
            for n, t in layer.adapters["default"].peft_tensors().items()}
    assert mine.keys() == saved.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(mine[key].detach(), tensor, rtol=1e-5, atol=1e-7)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {f"{path}.lora_E": m for path, m in masks.items()}
    assert {path: layer.adapters["default"].rank_pattern for path, layer in adapted_layers(model).items()} == masks

    # PEFT's pruned file loads into fresh full-rank adapters and gives PEFT's outputs.
    fresh = ours(init="none")
    for path, layer in adapted_layers(fresh).items():
        layer.adapters["default"].load_peft_tensors({n: saved[f"{PREFIX}{path}.{n}"] for n in TENSORS})
    reloaded = PeftModel.from_pretrained(tiny_model("tiny-llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_fully_pruned_layer_saves_and_loads_in_peft(ids, tmp_path):
    model = ours(init="none")
    layers = adapted_layers(model)
    pattern = {path: [i % 2 == 0 for i in range(6)] for path in layers}
    pattern["model.layers.0.self_attn.q_proj"] = [False] * 6
    for path, layer in layers.items():
        layer.adapters["default"].prune(pattern[path])
    tensors = {f"{PREFIX}{path}.{n}": t.detach().contiguous() for path, layer in layers.items()
               for n, t in layer.adapters["default"].peft_tensors().items()}
    assert tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A"].shape == (0, 64)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    fields = {k: getattr(OPTIONS, k) for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step")}
    AdaLoraConfig(**fields, lora_alpha=ALPHA, target_modules=TARGETS,
                  rank_pattern={f"{p}.lora_E": m for p, m in pattern.items()}).save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("tiny-llama"), tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    fresh, pruned_first = ours(), ours()  # loaded as is, or pruned by the config's rank_pattern first (PEFT's way)
    for path, layer in adapted_layers(fresh).items():
        layer.adapters["default"].load_peft_tensors({n: saved[f"{PREFIX}{path}.{n}"] for n in TENSORS})
    for path, layer in adapted_layers(pruned_first).items():
        layer.adapters["default"].prune(pattern[path])
        layer.adapters["default"].load_peft_tensors({n: saved[f"{PREFIX}{path}.{n}"] for n in TENSORS})
        assert layer.adapters["default"].rank_pattern == pattern[path]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for other in (reloaded, fresh, pruned_first):
            torch.testing.assert_close(other(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    empty = adapted_layers(fresh)["model.layers.0.self_attn.q_proj"].adapters["default"]
    assert empty.low_rank(None)[0].shape == (0, 64)


def test_low_rank_fold_is_exact_after_masking_and_when_empty(ids):
    model = ours(init="none")
    layers = list(adapted_layers(model).values())
    with torch.no_grad():
        for layer in layers:  # outputs of order 0.1, so that atol 1e-6 is a tight test in float32
            layer.adapters["default"].lora_A.mul_(0.05)
            layer.adapters["default"].lora_B.mul_(0.05)
        layers[0].adapters["default"].lora_E[[1, 4]] = 0
        layers[1].adapters["default"].lora_E.zero_()
    layers[2].adapters["default"].prune([True, False, True, True, False, False])
    layers[3].adapters["default"].prune([False] * 6)
    x = torch.randn(3, 5, 64)
    expected_ranks = [4, 0, 3, 0]
    for layer, rank in zip(layers, expected_ranks):
        adapter = layer.adapters["default"]
        a, b, scale = adapter.low_rank(layer.base_layer)
        assert a.shape == (rank, 64) and b.shape == (layer.out_features, rank)
        base_out = layer.base_layer(x)
        torch.testing.assert_close((x @ a.T @ b.T) * scale, adapter.delta(x, base_out, layer.base_layer),
                                   rtol=0, atol=1e-6)
    assert layers[0].adapters["default"].delta(x, x, None).abs().max() > 0.05


def test_merge_unmerge_and_quantized_base(ids):
    model = ours(init="none")
    with torch.no_grad():
        before = model(input_ids=ids).logits
        weight = adapted_layers(model)["model.layers.0.self_attn.q_proj"].base_layer.weight.clone()
        for layer in adapted_layers(model).values():
            layer.merge(["default"])
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
        for layer in adapted_layers(model).values():
            layer.unmerge()
        torch.testing.assert_close(adapted_layers(model)["model.layers.0.self_attn.q_proj"].base_layer.weight, weight)
    base = QuantLinear(Blockwise4bitWeight.from_dense(torch.randn(16, 64), "nf4", 64), None, torch.float32)
    with pytest.raises(AdapterError, match="can't merge in place"):
        AdaLoraAdapter(base, 4, ALPHA, 0.0, "none").merge(base)


@pytest.mark.parametrize("resume_at", [5, 9])  # while the budget shrinks; once the allocation is fixed
def test_resume_is_bit_exact(resume_at, ids):
    def run(model, hook, optimizer, steps):
        out = []
        for step in steps:
            train_step(model, hook, optimizer, ids, step)
            state = {f"{kind}.{key}": t.clone() for kind in ("exp_avg_ipt", "exp_avg_unc", "masks")
                     for key, t in getattr(hook, kind).items()}
            out.append((state, [p.detach().clone() for p in model.parameters() if p.requires_grad]))
        return out

    model = ours()
    hook, optimizer = AdaLoraHook(model, "default", OPTIONS), adam(model)
    run(model, hook, optimizer, range(resume_at))
    tensors = {p: {n: t.detach().clone() for n, t in layer.adapters["default"].peft_tensors().items()}
               for p, layer in adapted_layers(model).items()}
    buffer = io.BytesIO()
    torch.save(hook.state_dict(), buffer)
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    expected = run(model, hook, optimizer, range(resume_at, STEPS))

    def resumed():
        model = ours()
        for path, layer in adapted_layers(model).items():
            layer.adapters["default"].load_peft_tensors(tensors[path])
        hook, optimizer = AdaLoraHook(model, "default", OPTIONS), adam(model)
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        buffer.seek(0)
        hook.load_state_dict(torch.load(buffer))
        return run(model, hook, optimizer, range(resume_at, STEPS))

    for (state, params), (want_state, want_params) in zip(resumed(), expected, strict=True):
        assert state.keys() == want_state.keys()
        assert all(torch.equal(state[k], want_state[k]) for k in state)
        assert all(torch.equal(p, want) for p, want in zip(params, want_params, strict=True))
    assert any(0 < int(m.sum()) < 6 for k, m in want_state.items() if k.startswith("masks."))


def test_load_rejects_tensors_that_dont_fit():
    adapter = AdaLoraAdapter(torch.nn.Linear(64, 32), 6, ALPHA, 0.0, "kaiming")
    good = {"lora_A": torch.zeros(4, 64), "lora_B": torch.zeros(32, 4), "lora_E": torch.zeros(4, 1)}
    with pytest.raises(AdapterError, match=r"lora_B \(32, 3\) \(needs \(32, 4\)\)"):
        adapter.load_peft_tensors({**good, "lora_B": torch.zeros(32, 3)})
    with pytest.raises(AdapterError, match="init_r 6, 8 saved triplets"):
        adapter.load_peft_tensors({"lora_A": torch.zeros(8, 64), "lora_B": torch.zeros(32, 8),
                                   "lora_E": torch.zeros(8, 1)})
    adapter.load_peft_tensors(good)
    assert adapter.lora_A.shape == (4, 64) and adapter.rank_pattern == [True] * 4 + [False] * 2
    assert float(adapter.ranknum) == 6


def test_hook_needs_gradients_and_matching_state():
    model = ours()
    hook = AdaLoraHook(model, "default", OPTIONS)
    with pytest.raises(AdapterError, match="before optimizer.zero_grad"):
        hook.after_optimizer_step(0)
    other = AdaLoraHook(model, "default", AdaLoraOptions(init_r=6, target_r=2, total_step=20))
    with pytest.raises(AdapterError, match="total_step 20.*has 10"):
        hook.load_state_dict(other.state_dict())


def test_options_check_names_keys_and_the_fix():
    (key, message), = AdaLoraOptions(init_r=4, target_r=8).check()
    assert key == "target_r" and "target_r (8)" in message and "init_r (4)" in message
    (key, message), = AdaLoraOptions(tinit=8, tfinal=2, total_step=10).check()
    assert key == "tinit" and "total_step - tfinal (10 - 2 = 8)" in message and "lower tinit" in message
    assert AdaLoraOptions().check() == [] and OPTIONS.check() == []

    model = ours()
    with pytest.raises(AdapterError, match="total_step: unknown"):
        AdaLoraHook(model, "default", AdaLoraOptions(init_r=6, target_r=2))
    with pytest.raises(AdapterError, match=r"tinit \(3\) must be < total_step - tfinal \(5 - 2 = 3\)"):
        AdaLoraHook(model, "default", AdaLoraOptions(init_r=6, target_r=2, tinit=3, tfinal=2), total_step=5)
    assert AdaLoraHook(model, "default", AdaLoraOptions(init_r=6, target_r=2), total_step=10).total_step == 10
    with pytest.raises(AdapterError, match="no adapter named 'other'"):
        AdaLoraHook(model, "other", OPTIONS)

    _, problems = build(AdaLoraOptions, {"init_rr": 4, "beta1": 1.5, "tinit": 9, "total_step": 10, "tfinal": 1})
    text = "\n".join(p.text for p in problems)
    assert "init_r" in text and "beta1" in text and "tinit (9)" in text, text
