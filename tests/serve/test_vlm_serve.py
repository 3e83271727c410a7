"""Serving a vision-language base with many adapters: the engine runs the vision tower at prefill with
M-RoPE positions, batches text and image requests together, and answers as transformers + PEFT generate."""

import pytest
import torch
from references import require
from vlm_helpers import png

from loraforge.data.images import image_ref
from loraforge.data.vision import collate_vision, prompt_sample
from loraforge.models.tiny_vlm import tiny_vlm, tiny_vlm_processor
from loraforge.serve import Engine, Request, SamplingParams

PROCESSOR = tiny_vlm_processor()
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two PEFT adapters on the language model (random A and B), saved by PEFT itself."""
    peft = require("peft")
    folder = tmp_path_factory.mktemp("adapters")
    for seed, (name, targets) in enumerate({"attn": ["q_proj", "v_proj"], "mlp": ["gate_proj", "down_proj"]}.items()):
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                 target_modules=rf".*language_model.*\.({'|'.join(targets)})")
        peft.get_peft_model(tiny_vlm(), config).save_pretrained(folder / name)
    return {"attn": folder / "attn", "mlp": folder / "mlp"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [image_ref(str(png(folder / f"{i}.png", colour, size)), folder, "test")
            for i, (colour, size) in enumerate([((220, 40, 40), (56, 42)), ((40, 80, 220), (28, 70))])]


def prompt(text, images=()):
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    return prompt_sample(PROCESSOR, messages, list(images), PROCESSOR.chat_template)


def reference_answer(adapter_dir, sample):
    """transformers' generate (through PEFT when there is an adapter): greedy, no early stop."""
    peft = require("peft")
    model = tiny_vlm() if adapter_dir is None else peft.PeftModel.from_pretrained(tiny_vlm(), adapter_dir)
    batch = collate_vision([sample], PROCESSOR)
    batch.pop("labels")
    with torch.no_grad():
        out = model.eval().generate(**batch, do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                    pad_token_id=PROCESSOR.pad_token_id)
    return out[0, len(sample.input_ids):].tolist()


def test_mixed_text_and_image_requests_over_adapters_answer_as_hf_generate(adapters, images):
    engine = Engine(tiny_vlm(), PROCESSOR, device="cpu", adapters=adapters, pool_bytes=1 << 22)
    cases = [("attn", prompt("What is it?", images[:1])), (None, prompt("Hello, who are you?")),
             ("mlp", prompt("Compare them.", images)), ("mlp", prompt("Say something.")),
             (None, prompt("And this?", images[1:]))]
    requests = [Request(s.input_ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), adapter,
                        images=s.images) for adapter, s in cases]
    steps = []
    original = engine.runner.forward

    def spy(batch, kv):
        steps.append((len(batch.prefills), len(batch.images)))
        return original(batch, kv)

    engine.runner.forward = spy
    done = engine.generate(requests)
    assert steps[0] == (5, 3)  # one step prefilled the text and the image requests together
    assert len({tuple(c.token_ids) for c in done}) >= 4  # the answers depend on images and adapters
    for (adapter, sample), completion in zip(cases, done):
        assert completion.token_ids == reference_answer(adapter and adapters[adapter], sample), adapter


def test_image_requests_are_checked(images):
    engine = Engine(tiny_vlm(), PROCESSOR, device="cpu", pool_bytes=1 << 22)
    sample = prompt("What?", images[:1])
    with pytest.raises(ValueError, match="the prompt holds 0 image tokens; its 1 images need 12"):
        engine.generate([Request(prompt("What?").input_ids, images=images[:1])])
    with pytest.raises(ValueError, match=r"the prompt holds 12 image tokens but the request has no images"):
        engine.generate([Request(sample.input_ids)])


def test_an_adapter_on_the_vision_tower_is_refused_by_the_engine(tmp_path):
    from loraforge.adapters import AdapterFormatError, AdapterSpec, add_adapter, save_adapter

    model = tiny_vlm()
    spec = AdapterSpec(r=4, vision=["qkv"])
    add_adapter(model, spec)
    save_adapter(model, tmp_path, spec)
    with pytest.raises(AdapterFormatError, match="model.visual.blocks.0.attn.qkv"):
        Engine(tiny_vlm(), PROCESSOR, device="cpu", adapters={"v": tmp_path}, pool_bytes=1 << 22)


def test_the_openai_client_sends_image_url_parts_and_gets_hf_generates_answer(adapters, images, tmp_path):
    """A data URL and a local file under the image root, through the official client; the answer is
    PEFT + transformers' greedy answer. A file outside the root, a remote URL and an image for an assistant
    turn are refused with 400s."""
    openai = require("openai")
    from vlm_helpers import data_url

    from loraforge.serve.api import create_app

    from .helpers import ServerThread

    root = tmp_path / "images"
    inside = png(root / "red.png", (220, 40, 40), (56, 42))
    outside = png(tmp_path / "secret.png")
    engine = Engine(tiny_vlm(), PROCESSOR, device="cpu", adapters=adapters, pool_bytes=1 << 22)
    blue = data_url((40, 80, 220), (28, 70))
    expected = reference_answer(adapters["attn"], prompt("Compare them.", [image_ref(str(inside), root, "t"),
                                                                          image_ref(blue, root, "t")]))
    with ServerThread(create_app(engine, "tiny-vlm", image_root=root)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)

        def ask(*parts, model="attn", role="user"):
            content = [*parts, {"type": "text", "text": "Compare them."}]
            return client.chat.completions.create(model=model, messages=[{"role": role, "content": content}],
                                                  temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})

        def image(url):
            return {"type": "image_url", "image_url": {"url": url}}

        answer = ask(image(str(inside)), image(blue))
        assert answer.choices[0].message.content == PROCESSOR.tokenizer.decode(expected, skip_special_tokens=True)
        assert answer.usage.completion_tokens == MAX_TOKENS
        file_url = ask(image(f"file://{inside}"), image(blue)).choices[0].message.content
        assert file_url == answer.choices[0].message.content
        for parts, message in [((image(str(outside)),), "is outside the allowed image folder"),
                               ((image("https://example.com/a.png"),), "remote URLs are not fetched"),
                               ((image("data:image/png;base64,AAAA"),), "can't be read as an image")]:
            with pytest.raises(openai.BadRequestError, match=message):
                ask(*parts)
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\].content\[0\]: images belong in user"):
            ask(image(blue), role="assistant")
