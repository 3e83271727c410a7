"""``train.resume_from_checkpoint`` on bad input: one clear error naming the folder, the checkpoint or the key."""

import json
from pathlib import Path

import pytest

from loraforge.adapters import AdapterFormatError
from loraforge.cli.main import main
from loraforge.config import load_config
from loraforge.train import CheckpointError, TrainingError, run_training


def quiet(*_):
    pass


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_of(config_path, exception=ValueError) -> str:
    with pytest.raises(exception) as err:
        run_training(load_config(config_path), echo=quiet)
    return str(err.value)


def test_no_run_folder(toy_run, tmp_path):
    message = error_of(toy_run(train={"resume_from_checkpoint": "latest"}), TrainingError)
    assert message == (f"train.resume_from_checkpoint=latest: output.dir {tmp_path / 'run'} does not exist, so there "
                       "is nothing to resume; set output.dir to the run's folder, or drop resume_from_checkpoint to "
                       "start a new run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    message = error_of(toy_run(train={"resume_from_checkpoint": "latest"}), TrainingError)
    assert f"output.dir {tmp_path / 'run'} holds no run (config.yaml is missing), so there is nothing" in message


def test_run_without_checkpoints_through_the_cli(toy_run, tmp_path, capsys):
    run_training(load_config(toy_run()), echo=quiet)
    before = files_of(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", str(toy_run()), "train.resume_from_checkpoint=latest"]) == 2
    assert capsys.readouterr().err == (
        f"error: train.resume_from_checkpoint=latest: {tmp_path / 'run' / 'checkpoints'} holds no checkpoint (the "
        "run stopped before its first save; train.save_steps sets how often it saves); start the run again with "
        "output.overwrite_output_dir=true instead of resuming\n")
    assert files_of(tmp_path / "run") == before


def test_explicit_path_that_is_not_a_checkpoint(toy_run, tmp_path):
    run_training(load_config(toy_run(train={"save_steps": 4})), echo=quiet)
    checkpoints = tmp_path / "run" / "checkpoints"
    listing = f"{checkpoints} holds checkpoint-4, checkpoint-8 (or use latest)"
    missing = checkpoints / "checkpoint-5"
    assert error_of(toy_run(train={"resume_from_checkpoint": str(missing)}), CheckpointError) == (
        f"train.resume_from_checkpoint={missing}: no such checkpoint folder; {listing}")
    assert error_of(toy_run(train={"resume_from_checkpoint": str(tmp_path)}), CheckpointError) == (
        f"train.resume_from_checkpoint={tmp_path}: not a checkpoint (trainer_state.json is missing); {listing}")


def test_changed_rank_and_targets_are_listed_with_both_values(toy_run, tmp_path):
    run_training(load_config(toy_run(train={"save_steps": 4})), echo=quiet)
    changed = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    message = error_of(toy_run(adapter=changed, train={"resume_from_checkpoint": "latest"}), TrainingError)
    run = tmp_path / "run"
    assert message == (f"can't resume from {run / 'checkpoints' / 'checkpoint-8'}: it was written with other "
                       f"settings (see {run / 'config.yaml'}): adapter.r is 4 in the checkpoint, 8 in the config; "
                       "adapter.target_modules is 'all-linear' in the checkpoint, ['q_proj', 'v_proj'] in the config. "
                       "Resume with the same settings, or start a new output.dir")


def test_checkpoint_of_another_run_with_other_adapter_settings(toy_run, tmp_path):
    """The run's config.yaml matches, but the checkpoint named by path was written with another rank and targets."""
    other = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    run_training(load_config(toy_run(adapter=other, train={"save_steps": 4}, output={"dir": str(tmp_path / "a")})),
                 echo=quiet)
    run_training(load_config(toy_run(train={"save_steps": 4})), echo=quiet)
    before = files_of(tmp_path / "run")
    foreign = tmp_path / "a" / "checkpoints" / "checkpoint-4"
    message = error_of(toy_run(train={"resume_from_checkpoint": str(foreign)}), CheckpointError)
    assert message == (f"can't resume from {foreign}: adapter.r is 8 in the checkpoint, 4 in the config; "
                       "adapter.target_modules is ['q_proj', 'v_proj'] in the checkpoint, 'all-linear' in the config. "
                       "Resume with the settings it was written with, or start a new output.dir")
    assert files_of(tmp_path / "run") == before


@pytest.mark.parametrize("name", ["optimizer.safetensors", "rng.safetensors", "trainer_state.json",
                                  "adapter_model.safetensors"])
def test_truncated_checkpoint_file_is_named(toy_run, tmp_path, name):
    run_training(load_config(toy_run(train={"save_steps": 4})), echo=quiet)
    damaged = tmp_path / "run" / "checkpoints" / "checkpoint-8" / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    before = files_of(tmp_path / "run")
    message = error_of(toy_run(train={"resume_from_checkpoint": "latest"}), (CheckpointError, AdapterFormatError))
    assert message.startswith(f"{damaged}: not ")
    assert "is it truncated or corrupt?" in message
    assert files_of(tmp_path / "run") == before


def test_metrics_line_torn_by_a_crash_is_dropped_on_resume(toy_run, tmp_path):
    run_training(load_config(toy_run(train={"save_steps": 4, "max_steps": 4})), echo=quiet)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo')
    run_training(load_config(toy_run(train={"save_steps": 4, "resume_from_checkpoint": "latest"})), echo=quiet)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
