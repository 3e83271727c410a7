"""``loraforge train --nproc N``: the same command on N processes of this machine, under torchrun
(``torch.distributed.run``, in this process as its agent); several machines use torchrun directly
(README: "Training on several GPUs and machines")."""

from __future__ import annotations

import os
import socket


def train_on_processes(nproc: int, config_path: str, overrides: list[str]) -> int:
    """Run ``loraforge train config_path *overrides`` as ``nproc`` ranks rendezvousing on 127.0.0.1.

    Raises:
        CommandError: ``--nproc`` inside a torchrun worker, or with ``train.distributed: none``.
        DistributedError: a rank failed (its own error is printed above, by that rank).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from loraforge.cli.main import CommandError
    from loraforge.config import load_config
    from loraforge.config.llamafactory import looks_like_llamafactory
    from loraforge.train.distributed import DistributedError

    if "WORLD_SIZE" in os.environ:
        raise CommandError("--nproc: this process is already a torchrun worker (WORLD_SIZE is set); drop --nproc")
    if not looks_like_llamafactory(config_path) and load_config(config_path, overrides).train.distributed == "none":
        raise CommandError(f"--nproc {nproc}: {config_path} sets train.distributed: none; add the override "
                           "train.distributed=ddp (or fsdp), or set it in the config")
    args = get_args_parser().parse_args([
        "--nnodes", "1", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "loraforge.cli.main", "train", config_path, *overrides])
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        raise DistributedError(f"{len(err.failures)} of the {nproc} training processes failed; the first was rank "
                               f"{rank} (exit code {failure.exitcode}), whose error is printed above") from None
    return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
