"""``loraforge chat --image``: a vision-language model with an adapter answers as PEFT + transformers do."""

import torch
from PIL import Image
from references import require
from vlm_helpers import png, reference_processor

from loraforge.adapters import AdapterSpec, add_adapter, save_adapter
from loraforge.cli.main import main
from loraforge.models.tiny_vlm import TINY_VLM, tiny_vlm, tiny_vlm_processor


def test_chat_with_an_image_answers_as_peft_generate_does(tmp_path, capsys):
    peft = require("peft")
    model = tiny_vlm()
    spec = AdapterSpec(r=4, alpha=8, init="none", vision=True)
    torch.manual_seed(3)
    add_adapter(model, spec)
    save_adapter(model, tmp_path / "adapter", spec)
    image = png(tmp_path / "red.png", (220, 40, 40), (56, 42))

    processor = tiny_vlm_processor()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False,
                                                   add_generation_prompt=True)
    inputs = reference_processor()(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    reference = peft.PeftModel.from_pretrained(tiny_vlm(), tmp_path / "adapter").eval()
    with torch.no_grad():
        out = reference.generate(**inputs, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                 pad_token_id=processor.pad_token_id)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def answer(*adapter):
        assert main(["chat", "--model", TINY_VLM, *adapter, "--image", str(image), "--prompt", "What is it?",
                     "--max-new-tokens", "6", "--device", "cpu"]) == 0
        return capsys.readouterr().out.strip()

    assert answer("--adapter", str(tmp_path / "adapter")) == expected
    assert answer() != expected


def test_an_image_for_a_text_model_or_a_missing_image_is_an_error_line(tmp_path, capsys):
    assert main(["chat", "--model", "tiny-llama", "--image", str(png(tmp_path / "a.png")), "--prompt", "x"]) == 2
    assert "--image: tiny-llama is a text model" in capsys.readouterr().err
    assert main(["chat", "--model", TINY_VLM, "--image", str(tmp_path / "nope.png"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --image") and "not found" in err
