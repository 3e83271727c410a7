"""Vision-language data: image parts, token expansion against transformers' processor, labels, cutoff,
collation and M-RoPE positions, and file:line errors."""

from pathlib import Path

import pytest
import torch
from vlm_helpers import data_url, image_row, png, reference_processor, shapes_dataset, text_row, write_jsonl

from loraforge.data import DataError, read_records
from loraforge.data.tokenize import IGNORE_INDEX
from loraforge.data.vision import (
    build_vision_datasets,
    collate_vision,
    to_vision_conversations,
    tokenize_vision_conversations,
)
from loraforge.models.tiny_vlm import tiny_vlm, tiny_vlm_processor

PROCESSOR = tiny_vlm_processor()


def build(path: Path, cutoff_len: int = 512, on_overflow: str = "drop", format: str = "openai", eval_files=None):
    return build_vision_datasets(PROCESSOR, train_files=[str(path)], eval_files=eval_files, format=format,
                                 columns=None, val_size=0, cutoff_len=cutoff_len, train_on_prompt=False,
                                 system_prompt=None, template="auto", on_overflow=on_overflow, seed=0)


def conversations(path: Path, format: str = "openai"):
    return to_vision_conversations(read_records([path]), format, None, None)


def test_image_tokens_and_pixels_match_the_transformers_processor(tmp_path):
    path = shapes_dataset(tmp_path)
    convs = conversations(path)
    samples, _ = tokenize_vision_conversations(PROCESSOR, convs, PROCESSOR.chat_template, 512, False, "drop")
    reference = reference_processor()
    for conv, sample in zip(convs, samples):
        text = PROCESSOR.tokenizer.apply_chat_template(conv.messages, chat_template=PROCESSOR.chat_template,
                                                       tokenize=False)
        images = [image.open() for image in conv.images] or None
        expected = reference(text=[text], images=images, return_tensors="pt")
        assert sample.input_ids == expected["input_ids"][0].tolist()
        batch = collate_vision([sample], PROCESSOR)
        assert torch.equal(batch["mm_token_type_ids"], expected["mm_token_type_ids"].int())
        if images:
            assert torch.equal(batch["pixel_values"], expected["pixel_values"])
            assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])


def test_labels_cover_only_the_reply_never_an_image_token(tmp_path):
    path = shapes_dataset(tmp_path)
    samples = build(path).train
    image_id = PROCESSOR.image_token_id
    two_images = next(s for s in samples if len(s.images) == 2)
    assert sum(t == image_id for t in two_images.input_ids) == sum(
        PROCESSOR.image_token_count(*image.size) for image in two_images.images)
    for sample in samples:
        labelled = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
        assert image_id not in labelled
        reply = PROCESSOR.tokenizer.decode(labelled)
        assert reply.endswith("<|im_end|>") and "user" not in reply


def test_with_train_on_prompt_image_tokens_still_carry_no_label(tmp_path):
    convs = conversations(shapes_dataset(tmp_path))
    samples, _ = tokenize_vision_conversations(PROCESSOR, convs, PROCESSOR.chat_template, 512, True, "drop")
    for sample in samples:
        assert all(label == IGNORE_INDEX for t, label in zip(sample.input_ids, sample.labels)
                   if t == PROCESSOR.image_token_id)
        assert sum(label != IGNORE_INDEX for label in sample.labels) > len(sample.input_ids) // 2 - 64


def test_sharegpt_image_tags_take_the_images_in_order(tmp_path):
    png(tmp_path / "a.png", (255, 0, 0), (28, 28))
    png(tmp_path / "b.png", (0, 0, 255), (56, 28))
    row = {"conversations": [{"from": "human", "value": "<image>then<image>: which?"},
                             {"from": "gpt", "value": "Red, blue."}], "images": ["a.png", "b.png"]}
    (conv,) = conversations(write_jsonl(tmp_path / "d.jsonl", [row]), "sharegpt")
    assert [image.size for image in conv.images] == [(28, 28), (56, 28)]
    assert [p["type"] for p in conv.messages[0]["content"]] == ["image", "text", "image", "text"]


def test_a_padded_batch_mixing_text_and_image_rows_matches_each_row_alone(tmp_path):
    """Right padding, several images, a text-only row: the model's M-RoPE positions (computed from
    ``mm_token_type_ids``, ``image_grid_thw`` and the mask) and its logits agree with unbatched rows."""
    samples = build(shapes_dataset(tmp_path)).train
    picked = [next(s for s in samples if len(s.images) == 2), next(s for s in samples if not s.images),
              samples[0]]
    model = tiny_vlm()
    batch = collate_vision(picked, PROCESSOR)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, sample in enumerate(picked):
            alone = collate_vision([sample], PROCESSOR)
            logits = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
            n = len(sample.input_ids)
            torch.testing.assert_close(together[row, :n], logits, atol=1e-5, rtol=1e-4)


def test_cutoff_len_drops_samples_whose_images_it_would_cut_and_reports_them(tmp_path):
    png(tmp_path / "big.png", size=(112, 112))  # 64 image tokens
    rows = [image_row("big.png"), text_row(), image_row("big.png", answer="x" * 200)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = build(path, cutoff_len=60)
    assert len(data.train) == 1 and not data.train[0].images  # the text row
    assert data.report.train.image_overflow == [f"{path}:1", f"{path}:3"]
    assert f"2 of the dropped samples had image tokens past cutoff_len=60 (first: {path}:1, {path}:3)" in str(
        data.report)
    kept = build(path, cutoff_len=100)  # the images fit; the replies are truncated after them
    assert [len(s.images) for s in kept.train] == [1, 0, 1] and len(kept.train[2].input_ids) == 100
    assert kept.report.train.truncated == 2 and not kept.report.train.image_overflow
    with pytest.raises(DataError, match=rf"{path}:1: its image tokens end at token \d+, past data.cutoff_len=60"):
        build(path, cutoff_len=60, on_overflow="error")


@pytest.mark.parametrize(("row", "message"), [
    (image_row("missing.png"), r"d.jsonl:1: image 'missing.png' not found \(looked for .*missing.png\)"),
    (image_row("bad.png"), r"d.jsonl:1: image 'bad.png' can't be read as an image"),
    (image_row("data:image/png;base64,@@@"), r"d.jsonl:1: the image data URL's payload is not valid base64"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": [{"type": "image", "image": "ok.png"}]}]},
     r"d.jsonl:1: message 1 \(assistant\) holds an image; images belong in user turns"),
    ({"conversations": [{"from": "human", "value": "<image><image>?"}, {"from": "gpt", "value": "x"}],
      "images": ["ok.png"]}, r"d.jsonl:1: more <image> tags than images: the record lists 1 in 'images'"),
    ({"conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}], "images": ["ok.png"]},
     r"d.jsonl:1: 1 images listed but only 0 <image> tags"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]},
                   {"role": "assistant", "content": "x"}]}, r"d.jsonl:1: message 0 content\[0\] must be a text, image"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, row, message):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    png(tmp_path / "ok.png")
    format = "sharegpt" if "conversations" in row else "openai"
    with pytest.raises(DataError, match=message):
        build(write_jsonl(tmp_path / "d.jsonl", [row]), format=format)


def test_a_data_url_image_needs_no_file(tmp_path):
    (conv,) = conversations(write_jsonl(tmp_path / "d.jsonl", [image_row(data_url(size=(56, 28)))]))
    assert conv.images[0].size == (56, 28) and isinstance(conv.images[0].source, bytes)
