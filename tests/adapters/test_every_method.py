"""The shared suite every adapter method of the registry runs: save/load, merge, disable, mixed batches,
PEFT interop both ways (PEFT as the reference), and training, resume and export through the CLI on a dense
and on a quantized base. PiSSA, an init of LoRA, runs as its own case."""

import copy
import json

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model

from loraforge.adapters import (
    AdapterSpec,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    mark_only_adapters_trainable,
    merge_adapters,
    mixed_adapter_batch,
    save_adapter,
    unmerge_adapters,
)
from loraforge.adapters.adalora import AdaLoraOptions
from loraforge.adapters.registry import METHODS
from loraforge.cli.main import main
from loraforge.models import load_model, tiny_model
from loraforge.quant.quantize_model import quantize_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
CASES = {
    "lora": dict(method="lora", r=4, alpha=8, init="none"),
    "dora": dict(method="dora", r=4, alpha=8, init="none"),
    "qalora": dict(method="qalora", r=4, alpha=8, init="none"),
    "adalora": dict(method="adalora", alpha=8, init="none",
                    options=AdaLoraOptions(init_r=4, target_r=2, total_step=10)),
    "vera": dict(method="vera", r=8, init="none"),
    "pissa": dict(method="lora", r=4, alpha=8, init="pissa"),
}
"""Every registry method, and LoRA's PiSSA init; random inits, so that a fresh adapter changes the output."""


def test_every_registry_method_has_a_case():
    assert set(METHODS) <= set(CASES)


def base_model(case):
    model = tiny_model("tiny-llama")
    if case == "qalora":
        quantize_model(model, type="int", bits=4, block_size=32, compute_dtype="fp32")
    return model


def adapted(case, seed=0, name="default"):
    """A tiny model with the case's adapter, trained a few steps so that every tensor moved."""
    model = base_model(case)
    spec = AdapterSpec(target_modules=TARGETS, **CASES[case])
    torch.manual_seed(seed)
    add_adapter(model, spec, name)
    mark_only_adapters_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), spec


IDS = torch.randint(0, 250, (3, 10), generator=torch.Generator().manual_seed(3))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", CASES)
def test_the_adapter_changes_the_output_and_round_trips_through_files(case, tmp_path):
    model, spec = adapted(case)
    ours = logits(model)
    assert not torch.allclose(ours, logits(base_model(case)), atol=1e-4)
    save_adapter(model, tmp_path, spec)
    fresh = base_model(case)
    loaded_spec = load_adapter(fresh, tmp_path)
    assert loaded_spec.method == spec.method
    assert torch.allclose(logits(fresh), ours, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_merged_equals_unmerged_and_unmerge_restores(case):
    model, _ = adapted(case)
    unmerged = logits(model)
    merge_adapters(model)
    # QA-LoRA merges into the groups' fp16 offsets: exact up to fp16 rounding
    assert torch.allclose(logits(model), unmerged, atol=2e-3 if case == "qalora" else 1e-5)
    unmerge_adapters(model)
    assert torch.allclose(logits(model), unmerged, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_disabled_equals_the_base_it_wraps(case):
    """Disabled, the model computes with its base layers alone (PiSSA's base is the residual)."""
    model, _ = adapted(case)
    with disable_adapters(model):
        disabled = logits(model)
    bare = copy.deepcopy(model)
    delete_adapter(bare, "default")
    assert torch.allclose(disabled, logits(bare), atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c != "pissa"])  # PiSSA changes the base it wraps
def test_a_mixed_batch_equals_each_adapter_alone(case):
    model, spec = adapted(case, seed=0, name="a")
    other, _ = adapted(case, seed=1, name="b")
    add_adapter(model, spec, "b")
    for path, module in other.named_modules():
        if hasattr(module, "adapters"):
            model.get_submodule(path).adapters["b"].load_state_dict(module.adapters["b"].state_dict())
    with mixed_adapter_batch(model, ["a", None, "b"]):
        mixed = logits(model)
    alone_a, _ = adapted(case, seed=0, name="a")
    assert torch.allclose(mixed[0], logits(alone_a)[0], atol=1e-5)
    assert torch.allclose(mixed[1], logits(base_model(case))[1], atol=1e-5)
    assert torch.allclose(mixed[2], logits(other)[2], atol=1e-5)


def peft_config(case):
    """PEFT's config for the case, with random init so that a fresh adapter changes the output."""
    common = dict(target_modules=TARGETS, task_type="CAUSAL_LM")
    if case == "adalora":
        return AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, init_lora_weights=False, **common)
    if case == "vera":
        return VeraConfig(r=8, init_weights=False, **common)
    if case == "pissa":
        return LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", **common)
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=case == "dora",
                      use_qalora=case == "qalora", qalora_group_size=32, **common)


@pytest.mark.parametrize("case", [c for c in CASES if c != "qalora"])  # PEFT quantizes with GPTQ/AWQ only
def test_ours_loads_in_peft_with_the_same_logits(case, tmp_path):
    model, spec = adapted(case)
    save_adapter(model, tmp_path, spec)
    peft_model = PeftModel.from_pretrained(base_model(case), tmp_path).eval()
    assert torch.allclose(logits(peft_model), logits(model), atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c != "qalora"])
def test_peft_adapter_loads_in_ours_with_the_same_logits(case, tmp_path):
    torch.manual_seed(5)
    peft_model = get_peft_model(base_model(case), peft_config(case)).eval()
    with torch.no_grad():  # move the trainable tensors off their init, as training would
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    expected = logits(peft_model)
    if case == "pissa":  # PEFT's pissa_convert: the file applies to the original weight
        initial = _saved_initial_pissa(tmp_path / "initial")
        peft_model.save_pretrained(tmp_path / "a", path_initial_model_for_weight_conversion=str(initial))
    else:
        peft_model.save_pretrained(tmp_path / "a")
    ours = base_model(case)
    load_adapter(ours, tmp_path / "a")
    assert torch.allclose(logits(ours), expected, atol=1e-5)


def _saved_initial_pissa(folder):
    """PiSSA's initial adapter, saved as PEFT's pissa_convert needs it (the init is a deterministic SVD)."""
    initial = get_peft_model(base_model("pissa"), peft_config("pissa"))
    initial.peft_config["default"].init_lora_weights = True  # as PEFT's own pissa_convert example saves it
    initial.save_pretrained(folder)
    return folder


BASES = {"dense": None, "nf4": dict(type="nf4"), "int4": dict(type="int", bits=4, block_size=32)}
TRAIN_CASES = [(case, base) for case in CASES for base in BASES
               if (base == "int4" if case == "qalora" else base == "dense" if case == "pissa" else True)]
"""Each method on a dense base and on NF4 and INTk bases; QA-LoRA needs INTk groups, PiSSA a dense base."""


def quantized_tiny(base):
    model = tiny_model("tiny-llama")
    if BASES[base] is not None:
        quantize_model(model, compute_dtype="fp32", **BASES[base])
    return model


def _quantization_yaml(base):
    if BASES[base] is None:
        return "null"
    fields = {("group_size" if k == "block_size" else k): v for k, v in BASES[base].items()}
    return json.dumps({**fields, "compute_dtype": "fp32"})


def _options_yaml(case):
    fields = CASES[case]
    options = {"init_r": 4, "target_r": 2} if case == "adalora" else {}
    adapter = {k: v for k, v in fields.items() if k not in ("options", "init")} | {"init": fields["init"].replace(
        "none", "kaiming")}
    return json.dumps({**adapter, "options": options or None, "target_modules": TARGETS})


@pytest.mark.parametrize("case, base", TRAIN_CASES)
def test_trains_through_the_cli_and_exports_merged(case, base, tmp_path, capsys):
    """`loraforge train` (with a resume) and `loraforge export --run`: the merged HF folder computes what the
    run's base plus its saved adapter computes."""
    rows = [{"instruction": f"say {w}", "output": w.upper()} for w in ["cat", "dog", "sun", "sky", "red", "box"]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(
        f"model: {{source: tiny-llama, threads: 1, quantization: {_quantization_yaml(base)}}}\n"
        f"adapter: {_options_yaml(case)}\n"
        "data: {train_files: train.jsonl, cutoff_len: 64}\n"
        f"train: {{max_steps: 6, batch_size: 2, lr: 0.02, save_steps: 3}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert main(["train", str(tmp_path / "c.yaml"), "train.resume_from_checkpoint=latest"]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--device", "cpu"]) == 0
    merged, _ = load_model(str(tmp_path / "hf"))
    unmerged = quantized_tiny(base)
    load_adapter(unmerged, tmp_path / "run" / "adapter")
    assert not torch.allclose(logits(unmerged), logits(tiny_model("tiny-llama")), atol=1e-4), "training moved nothing"
    assert torch.allclose(logits(merged), logits(unmerged), atol=1e-4)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("adapter, quantization, message", [
    ("{method: adalora, options: {init_r: 4, target_r: 8}}", "null",
     "adapter.options.target_r: target_r (8) must be <= init_r (4)"),
    ("{method: adalora, options: {tinit: 8, tfinal: 2, total_step: 10}}", "null",
     "adapter.options.tinit: tinit (8) must be < total_step - tfinal (10 - 2 = 8)"),
    ("{method: adalora, options: {target_rr: 2}}", "null",
     "unknown key 'adapter.options.target_rr'; did you mean 'adapter.options.target_r'?"),
    ("{method: lora, options: {target_r: 2}}", "null", "adapter.options: takes no value here"),
    ("{method: vera, rank_pattern: {q_proj: 4}}", "null", "adapter.rank_pattern: does not apply to vera"),
    ("{method: lora, init: pissa}", "{type: nf4}", "adapter.init: pissa moves the weight's principal part"),
    ("{method: dora, init: pissa}", "null", "adapter.init: 'pissa' is not an init of dora"),
    ("{method: qalora}", "{type: nf4}", "adapter.method: qalora trains on a quantized base of type int or gguf"),
])
def test_bad_method_settings_are_named(adapter, quantization, message, tmp_path):
    from loraforge.config import ConfigError, load_config

    (tmp_path / "c.yaml").write_text(f"model: {{source: tiny-llama, quantization: {quantization}}}\n"
                                     f"adapter: {adapter}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml", check_files=False)
    assert message in str(err.value)


def test_a_schedule_longer_than_the_run_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 4)
    (tmp_path / "c.yaml").write_text("model: {source: tiny-llama}\nadapter: {method: adalora, options: {tinit: 5}}\n"
                                     f"data: {{train_files: train.jsonl}}\ntrain: {{max_steps: 4}}\n"
                                     f"output: {{dir: {tmp_path / 'run'}}}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "tinit (5) must be < total_step - tfinal (4 - 0 = 4)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_peft_type_we_lack_is_named_with_the_supported_ones(tmp_path):
    from safetensors.torch import save_file

    from loraforge.adapters import AdapterFormatError

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 4}))
    save_file({"base_model.model.model.layers.0.mlp.down_proj.ia3_l": torch.ones(1, 128)},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match=r"peft_type 'IA3' is not supported; loraforge loads \['ADALORA', "
                                                 r"'LORA', 'VERA'\] adapters \(adalora, dora, lora, qalora, vera\)"):
        load_adapter(tiny_model("tiny-llama"), tmp_path)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_starts_at_the_base_output_and_takes_the_principal_part(init):
    """At init the model computes what it did; the base keeps the residual. Exact SVD: the residual's top
    singular value is the weight's (r+1)-th. Fast SVD: the principal part taken is at most the exact one's."""
    model = tiny_model("tiny-llama")
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    before = logits(model)
    add_adapter(model, AdapterSpec(r=4, alpha=8, init=init, target_modules=TARGETS))
    assert torch.allclose(logits(model), before, atol=1e-5)
    residual = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach()
    singular = torch.linalg.svdvals(original)
    if init == "pissa":
        assert torch.allclose(torch.linalg.svdvals(residual)[0], singular[4], rtol=1e-4)
    else:
        taken = original.norm() ** 2 - residual.norm() ** 2
        assert 0 < taken <= (singular[:4] ** 2).sum() * (1 + 1e-4)
