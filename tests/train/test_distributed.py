"""Training on two processes (torch.distributed, gloo on CPU): DDP, FSDP2 and QLoRA+FSDP2 give the adapter
of a one-process run whose micro-batch is both ranks' together; a rank lost mid-run stops the other with
a clear error and leaves a checkpoint that resumes on one process to the uninterrupted result; ranks
started with different configs are refused.

The two-process runs go through the user's path: ``loraforge train --nproc 2`` (torchrun in the CLI
process) or, where one rank must be killed or fed another config, two ``loraforge train`` processes
with the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free port).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from loraforge.cli.main import main
from loraforge.config import ConfigError, load_config
from loraforge.train import run_training
from loraforge.train.distributed import DistributedError, World, init_world

WORDS = ["cat", "dog", "sun", "sky", "red", "box", "pen", "cup", "hat", "map", "owl", "fig", "ant"]
QLORA = {"quantization": {"type": "nf4", "compute_dtype": "fp32"}}
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
"""For the adapters after 4 Adam steps at lr 3e-2: summation orders differ between one process and two (the ranks'
halves of the batch, then the gradients' reduction), and Adam's normalisation grows a ~1e-7 relative gradient
difference in a small-gradient element into a visible weight difference. The largest seen: 4.9e-5 on a 0.075 weight
(QLoRA, a 2-core AVX512 Xeon; 2e-5 held on AVX2 machines). The losses and gradient norms, compared to rel 1e-5 per
step, are the tight check: a wrongly scaled or missing reduction moves those, where Adam's scale-free step hides it
in the weights."""


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """9 training samples: at batch_size 4 each epoch ends on a 1-sample micro-batch, of which rank 1's
    share is empty (it runs at weight 0)."""
    root = tmp_path_factory.mktemp("dist")
    rows = [{"instruction": f"say {w}", "output": w.upper()} for w in WORDS]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config_file(folder: Path, name: str, model: dict | None = None, **train) -> Path:
    config = {
        "model": {"source": "tiny-llama", "threads": 1, **(model or {})},
        "adapter": {"r": 4, "alpha": 8},
        "data": {"train_files": "train.jsonl", "val_size": 4, "cutoff_len": 64},
        "train": {"batch_size": 4, "grad_accum": 2, "lr": 3e-2, "max_steps": 4, "save_steps": 2, **train},
        "output": {"dir": str(folder / name), "tensorboard": False, "plot": False},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def adapter_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path) -> None:
    """Same adapter within fp32 tolerance, and one metrics line per step with the same losses and norms."""
    ours, theirs = adapter_of(run), adapter_of(reference)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], **TOLERANCE, msg=key)
    logged, expected = metrics_of(run), metrics_of(reference)
    assert [sorted(m) for m in logged] == [sorted(m) for m in expected]  # rank 0 alone logs: no duplicates
    for got, want in zip(logged, expected, strict=True):
        for key in ("loss", "grad_norm", "eval_loss", "tokens_seen", "lr"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)


@pytest.fixture(scope="module")
def one_process(folder):
    """The references: one process at the batch both ranks share, dense and QLoRA."""
    runs = {}
    for name, model in (("one", None), ("one_qlora", QLORA)):
        run_training(load_config(config_file(folder, name, model)), echo=quiet)
        runs[name] = folder / name
    return runs


def train_with_nproc_2(folder: Path, name: str, strategy: str, model: dict | None = None) -> str:
    path = config_file(folder, name, model, distributed=strategy)
    done = subprocess.run([sys.executable, "-m", "loraforge.cli.main", "train", "--nproc", "2", str(path)],
                          capture_output=True, text=True, timeout=240, env=_env(), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def shard_offsets(run: Path, step: int) -> dict[str, dict[str, list[int]]]:
    """Per shard file of checkpoint ``step``: each tensor's offset in the whole (DCP's safetensors header)."""
    files = sorted((run / "checkpoints" / f"checkpoint-{step}" / "sharded").iterdir())
    out = {}
    for file in files:
        with safe_open(file, "pt") as f:
            out[file.name] = {k: v["saved_offsets"] for k, v in json.loads(f.metadata()["DCP_SHARDING_INFO"]).items()}
    return out


def test_ddp_on_two_processes_equals_one_process(folder, one_process):
    stdout = train_with_nproc_2(folder, "ddp", "ddp")
    assert_same_run(folder / "ddp", one_process["one"])
    assert stdout.count("adapter saved to") == 1  # rank 0 alone reports
    shards = shard_offsets(folder / "ddp", 4)
    assert len(shards) == 2  # both ranks wrote; replicated tensors are written once (DCP deduplicates)
    keys = [set(s) for s in shards.values()]
    assert not keys[0] & keys[1]
    assert all(offset == [0] * len(offset) for s in shards.values() for offset in s.values())


def test_fsdp_on_two_processes_equals_one_process(folder, one_process):
    stdout = train_with_nproc_2(folder, "fsdp", "fsdp")
    assert_same_run(folder / "fsdp", one_process["one"])
    assert "fsdp: " in stdout and "(0 of them quantized storage) sharded over 2 ranks" in stdout
    shards = shard_offsets(folder / "fsdp", 4)
    first, second = shards.values()
    key = "adapter.model.layers.0.self_attn.q_proj.adapters.default.lora_A"
    rows = load_file(folder / "fsdp" / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0]
    assert first[key] == [0, 0] and second[key] == [rows // 2, 0]  # each rank saved its half
    assert first[f"optimizer.{key[len('adapter.'):]}.exp_avg"] == [0, 0]


def test_qlora_with_fsdp_on_two_processes_equals_one_process(folder, one_process):
    stdout = train_with_nproc_2(folder, "fsdp_qlora", "fsdp", QLORA)
    assert_same_run(folder / "fsdp_qlora", one_process["one_qlora"])
    line = next(line for line in stdout.splitlines() if line.startswith("fsdp: "))
    quantized = int(line.split("(")[1].split()[0])
    assert quantized >= 14  # the packed codes and scales of each of tiny-llama's 14 quantized linears


def test_a_killed_rank_stops_the_other_and_the_run_resumes_on_one_process(folder):
    config = config_file(folder, "killed", distributed="fsdp", max_steps=16, save_steps=4)
    run = folder / "killed"
    ranks = start_ranks([[str(config)], [str(config)]])
    try:
        started = time.monotonic()
        while not (run / "checkpoints" / "checkpoint-4").is_dir():
            assert time.monotonic() - started < 120 and ranks[0].poll() is None, "no checkpoint-4 appeared"
            time.sleep(0.01)
        ranks[1].kill()
        _, stderr = ranks[0].communicate(timeout=60)
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 2
    assert "error: rank 0 of 2: lost the other ranks (one died, or did not answer within " \
           "train.distributed_timeout=600 s: " in stderr
    assert "resume with train.resume_from_checkpoint=latest, on any number of processes" in stderr
    assert not (run / "adapter").exists()
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and all((c / "trainer_state.json").is_file() for c in checkpoints)

    run_training(load_config(config, ["train.resume_from_checkpoint=latest"]), echo=quiet)  # one process now
    uninterrupted = config_file(folder, "uninterrupted", distributed="fsdp", max_steps=16, save_steps=4)
    run_training(load_config(uninterrupted), echo=quiet)
    theirs = adapter_of(folder / "uninterrupted")
    for key, value in adapter_of(run).items():
        torch.testing.assert_close(value, theirs[key], **TOLERANCE, msg=key)


def test_a_hung_rank_stops_the_other_after_the_timeout(folder):
    config = config_file(folder, "hung", distributed="ddp", max_steps=40, distributed_timeout=10)
    run = folder / "hung"
    ranks = start_ranks([[str(config)], [str(config)]])
    try:
        started = time.monotonic()
        while not (run / "checkpoints" / "checkpoint-2").is_dir():
            assert time.monotonic() - started < 120 and ranks[0].poll() is None, "no checkpoint-2 appeared"
            time.sleep(0.01)
        os.kill(ranks[1].pid, signal.SIGSTOP)
        _, stderr = ranks[0].communicate(timeout=90)
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 2
    assert "error: rank 0 of 2: lost the other ranks (one died, or did not answer within " \
           "train.distributed_timeout=10 s: " in stderr and "Timed out" in stderr
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()


def test_ranks_with_different_configs_are_refused(folder):
    config = config_file(folder, "mismatch", distributed="ddp")
    ranks = start_ranks([[str(config), "train.lr=0.01"], [str(config), "train.lr=0.02"]])
    outputs = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2]
    for stderr in outputs:
        assert ("error: the 2 processes of this run were started with different configs: rank(s) 1 differ from "
                "rank 0. Every process must get the same config file, the same overrides") in stderr
    assert not (folder / "mismatch").exists()  # refused before anything was written


def start_ranks(arguments: list[list[str]]) -> list[subprocess.Popen]:
    """One ``loraforge train`` process per rank, with the rendezvous variables torchrun would set."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "loraforge.cli.main", "train", *args],
                             env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(arguments)),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank, args in enumerate(arguments)]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_each_rank_takes_a_contiguous_share_and_together_all(size):
    for n in range(11):
        indices = list(range(100, 100 + n))
        shares = [World("ddp", rank, size).share(indices) for rank in range(size)]
        assert [i for share in shares for i in share] == indices
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_several_processes_need_a_strategy(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="this process is rank 0 of 2 .launched by torchrun., but "
                                               "train.distributed is none; set train.distributed: ddp or fsdp"):
        init_world("none", 60)


def test_nproc_with_strategy_none_is_refused(folder, capsys):
    path = config_file(folder, "nproc_none")
    assert main(["train", "--nproc", "2", str(path)]) == 2
    assert capsys.readouterr().err == (f"error: --nproc 2: {path} sets train.distributed: none; add the override "
                                       "train.distributed=ddp (or fsdp), or set it in the config\n")


def test_distributed_settings_are_checked(folder):
    path = config_file(folder, "settings")
    with pytest.raises(ConfigError, match="train.distributed: expected one of none, ddp, fsdp, got 'dpp'; did you "
                                          "mean 'ddp'"):
        load_config(path, ["train.distributed=dpp"])
    with pytest.raises(ConfigError, match="train.distributed: ddp can't train adapter.method adalora: its "
                                          "training hook"):
        load_config(path, ["train.distributed=ddp", "adapter.method=adalora"])
    with pytest.raises(ConfigError, match="data.test_files: generation for the exact-match test needs the whole"):
        load_config(path, ["train.distributed=fsdp", "data.test_files=[train.jsonl]"])
