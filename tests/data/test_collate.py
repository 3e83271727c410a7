import random

import pytest
import torch

from loraforge.data.collate import batches, collate, pack
from loraforge.data.formats import Conversation
from loraforge.data.tokenize import IGNORE_INDEX, Sample, tokenize_conversations
from loraforge.models.tiny import tiny_model, tiny_tokenizer


def chat_samples(n, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "eta"]
    conversations = [
        Conversation(
            [
                {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 6)))},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 6)))},
            ],
            f"d.jsonl:{i + 1}",
        )
        for i in range(n)
    ]
    samples, _ = tokenize_conversations(tiny_tokenizer(), conversations, "auto", 512, False)
    return samples


def fake(lengths):
    return [Sample(list(range(1, n + 1)), [IGNORE_INDEX] + list(range(2, n + 1))) for n in lengths]


def test_collate_pads_right():
    batch = collate(fake([3, 1]), pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pack_fits_rows_and_restarts_positions():
    samples = fake([5, 4, 3, 3, 2, 1])
    rows = pack(samples, cutoff_len=8)
    assert all(len(r.input_ids) <= 8 for r in rows)
    assert [[len(r.input_ids), r.position_ids.count(0)] for r in rows] == [[8, 2], [8, 3], [2, 1]]  # 5+3, 4+3+1, 2
    for row in rows:
        starts = [k for k, p in enumerate(row.position_ids) if p == 0]
        assert all(row.labels[k] == IGNORE_INDEX for k in starts)
        assert len(row.labels) == len(row.input_ids) == len(row.position_ids)
    assert sum(len(r.input_ids) for r in rows) == sum(len(s.input_ids) for s in samples)


def test_pack_masks_first_label_of_every_segment():
    rows = pack([Sample([1, 2], [1, 2]), Sample([3, 4], [3, 4])], cutoff_len=4)
    assert rows == [Sample([1, 2, 3, 4], [IGNORE_INDEX, 2, IGNORE_INDEX, 4], [0, 1, 0, 1])]


def test_pack_rejects_a_sample_longer_than_cutoff():
    with pytest.raises(ValueError, match="sample 0 cannot be packed"):
        pack(fake([9]), cutoff_len=8)


def test_collate_packed_rows_gives_positions_and_no_attention_mask():
    rows = pack(fake([3, 2, 2]), cutoff_len=5)
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"][1, 2:].tolist() == [IGNORE_INDEX] * 3
    with pytest.raises(ValueError, match="cannot collate packed rows together with unpacked"):
        collate([rows[0], *fake([2])], pad_id=0)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_packed_segments_match_samples_run_alone(family):
    """No leakage: each packed segment's logits equal those of its sample run alone."""
    torch.manual_seed(0)
    model = tiny_model(family)
    samples = chat_samples(6)
    rows = pack(samples, cutoff_len=max(len(s.input_ids) for s in samples) + 20)
    assert any(row.position_ids.count(0) > 1 for row in rows)
    batch = collate(rows, pad_id=tiny_tokenizer().pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        checked = 0
        for r, row in enumerate(rows):
            starts = [k for k, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
            for start, end in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row.input_ids[start:end]])).logits[0]
                torch.testing.assert_close(packed[r, start:end], alone, atol=1e-5, rtol=0)
                checked += 1
    assert checked == len(samples)


def test_batches_are_deterministic_and_cover_every_sample():
    samples = fake([random.Random(i).randint(1, 50) for i in range(300)])
    first = batches(samples, batch_size=4, seed=3, epoch=1)
    assert first == batches(samples, batch_size=4, seed=3, epoch=1)
    assert first != batches(samples, batch_size=4, seed=3, epoch=2)
    assert first != batches(samples, batch_size=4, seed=4, epoch=1)
    assert sorted(i for batch in first for i in batch) == list(range(300))
    assert sum(len(b) < 4 for b in first) == 0


def test_batches_group_similar_lengths():
    lengths = [random.Random(i).randint(1, 200) for i in range(256)]
    samples = fake(lengths)

    def padded(order):
        return sum(len(b) * max(lengths[i] for i in b) for b in order)

    shuffled = list(range(256))
    random.Random(0).shuffle(shuffled)
    plain = [shuffled[k : k + 8] for k in range(0, 256, 8)]
    assert padded(batches(samples, batch_size=8, seed=0, epoch=0)) < 0.7 * padded(plain)
