"""``loraforge estimate``: the component table and verdict, exit 1 when the run won't fit, and config
errors as one ``error:`` block with the key's did-you-mean."""

from loraforge.cli.main import main


def test_estimate_prints_every_component_and_the_verdict(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {source: tiny-llama}\ndata: {cutoff_len: 64}\n")
    assert main(["estimate", str(config), "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    for part in ("runtime", "weights", "adapter", "gradients", "optimizer", "activations", "logits", "total"):
        assert part in out
    assert "128 tokens per micro-batch" in out and "\nfits: about" in out


def test_estimate_says_wont_fit_and_what_to_change(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {source: tiny-llama}\ndata: {cutoff_len: 1000000}\ntrain: {batch_size: 4096}\n")
    assert main(["estimate", str(config)]) == 1
    out = capsys.readouterr().out
    assert "won't fit" in out and "what would help" in out and "train.gradient_checkpointing=true" in out


def test_estimate_reports_a_bad_key_with_did_you_mean(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {source: tiny-llama}\ntrain:\n  learnig_rate: 1e-4\n")
    assert main(["estimate", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:3" in err and "did you mean 'train.lr'" in err and "Traceback" not in err
