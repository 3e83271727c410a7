"""Training on several processes with torch.distributed: the process group, DDP or FSDP2, and the few
collectives the loop needs. torchrun (``torch.distributed.run``) launches the processes and sets the
rendezvous variables; nothing here launches, routes or serialises by itself.

One process per device. ``train.batch_size`` is the micro-batch of the whole job: every optimizer step
takes the same micro-batches, in the same order, as a one-process run (``data.collate.batches``), and
rank ``r`` of ``n`` runs its contiguous share of each (:meth:`World.share`). The loss is divided by the
step's label count summed over all ranks, and DDP's/FSDP's gradient mean is undone (the loss is scaled
by the world size), so the gradients, hence the adapter, equal those of the one-process run up to
float rounding; and a checkpoint resumes exactly with any number of processes.

- ``ddp``: ``DistributedDataParallel`` over the model; every rank holds all weights; the adapter's
  gradients are all-reduced once per optimizer step (``no_sync`` on the other micro-batches).
- ``fsdp``: FSDP2 (``fully_shard``) on each decoder layer (``model._no_split_modules``) and on the
  whole; the frozen base weights, the adapter and the optimizer state are sharded over the ranks. A
  quantized base (QLoRA) shards too: its packed codes and scales are turned into frozen parameters
  (:func:`quantized_storage_as_parameters`), which FSDP2 cuts along their first dimension like any
  other weight and all-gathers before each layer's forward and backward, as torchtune does with its
  NF4 tensors. Zero-dimensional constants (a double-quant offset) stay replicated buffers.

Where this does not yet scale: each rank loads (and quantizes) the whole base model before it is
sharded, so the base must fit once in one device's memory (a 4-bit 70B does on 80 GB; a bf16 70B does
not); a meta-device load of each rank's shard would lift that.
"""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from loraforge.train.loss import summed_token_loss

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets in each process; a run sees itself as distributed when ``WORLD_SIZE`` is set."""


class DistributedError(RuntimeError):
    """The processes of a run can't work together: different configs or data, a rank lost, a bad launch."""


class LostRanksError(DistributedError):
    """Another rank died or hung. The process group can't be torn down then: tearing it down (or the
    store's server at interpreter exit) may wait on a hung peer's open connection. So it is left as it is,
    and the CLI ends the process at once after printing the error (``abandon_process``); the last
    checkpoint is complete, since checkpoints are written atomically."""

    abandon_process = True


class TokenLoss(nn.Module):
    """The training forward as a module, so that DDP's and FSDP2's hooks see it: ``batch -> (summed
    next-token loss, labelled positions)`` of ``model`` (``train.loss.summed_token_loss``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return summed_token_loss(self.model, batch)


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size``, the strategy, and the device it trains on.
    A one-process run is a world of size 1, whose collectives return their input."""

    strategy: str
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return self.size > 1

    def share(self, indices: list[int]) -> list[int]:
        """This rank's contiguous part of a micro-batch (sizes differ by at most one; may be empty)."""
        start, end = (len(indices) * self.rank) // self.size, (len(indices) * (self.rank + 1)) // self.size
        return indices[start:end]

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if not self.grouped:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a Ctrl-C that reached some ranks only)."""
        return bool(self.sum(float(flag))[0])

    def barrier(self) -> None:
        if self.grouped:
            dist.barrier()

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (as bytes in tensors: nothing is pickled)."""
        if not self.grouped:
            return text
        data = (text or "").encode() if self.is_main else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=self._comm_device)
        dist.broadcast(length, 0)
        buffer = torch.zeros(int(length), dtype=torch.uint8, device=self._comm_device)
        if self.is_main:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, 0)
        return bytes(buffer.cpu().tolist()).decode()

    def on_main(self, work):
        """Run ``work()`` on rank 0 only and return its result as text (None stays None) on every rank;
        when it raises, rank 0 raises its error and the others a ``DistributedError`` with its message."""
        if not self.grouped:
            result = work()
            return None if result is None else str(result)
        outcome, error = "", None
        if self.is_main:
            try:
                result = work()
                outcome = "none\n" if result is None else f"value\n{result}"
            except Exception as err:  # noqa: BLE001 - re-raised below, once the others are told
                outcome, error = f"error\n{err}", err
        status, _, value = self.broadcast_text(outcome).partition("\n")
        if error is not None:
            raise error
        if status == "error":
            raise DistributedError(f"rank 0 stopped the run: {value}")
        return None if status == "none" else value

    def check_same(self, what: str, fingerprint: str) -> None:
        """Refuse to start when the ranks hold different ``what`` (config, data): each rank's sha256 of
        ``fingerprint`` is all-gathered and compared with rank 0's.

        Raises:
            DistributedError: naming the ranks that differ from rank 0.
        """
        if not self.grouped:
            return
        digest = torch.frombuffer(bytearray(hashlib.sha256(fingerprint.encode()).digest()), dtype=torch.uint8)
        digest = digest.to(torch.int64).to(self._comm_device)
        gathered = [torch.empty_like(digest) for _ in range(self.size)]
        dist.all_gather(gathered, digest)
        differ = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
        if differ:
            raise DistributedError(
                f"the {self.size} processes of this run were started with different {what}: rank(s) "
                f"{', '.join(map(str, differ))} differ from rank 0. Every process must get the same config file, "
                "the same overrides and the same data files (on multi-node runs: the same paths with the same "
                "contents on every node)")

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop runs (``batch -> (summed loss, count)``): ``model`` under DDP or FSDP2 for
        this world, or as it is in a one-process run. FSDP2 changes ``model``'s parameters into DTensor
        shards in place, so build the optimizer after this."""
        loss = TokenLoss(model)
        if not self.grouped:
            return loss
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(loss, device_ids=ids, broadcast_buffers=False)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        quantized_storage_as_parameters(model)
        mesh = init_device_mesh(self.device.type, (self.size,))
        units = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in units:
                fully_shard(module, mesh=mesh)
        return fully_shard(loss, mesh=mesh)

    def shard_summary(self, model: nn.Module) -> str | None:
        """One line on what FSDP2 shards: the parameter tensors split over the ranks (how many of them
        quantized storage) and the bytes this rank holds, against the buffers every rank keeps whole.
        None when nothing is sharded."""
        from torch.distributed.tensor import DTensor

        sharded = {name: p for name, p in model.named_parameters() if isinstance(p, DTensor)}
        if not sharded:
            return None
        held = sum(p.to_local().nbytes for p in sharded.values())
        whole = sum(p.numel() * p.element_size() for p in sharded.values())
        quantized = sum(".qweight." in name for name in sharded)
        replicated = sum(b.nbytes for b in model.buffers())
        return (f"fsdp: {len(sharded)} parameter tensors ({quantized} of them quantized storage) sharded over "
                f"{self.size} ranks: rank {self.rank} holds {held / 2**20:.2f} of {whole / 2**20:.2f} MiB; "
                f"{replicated / 2**20:.2f} MiB of buffers stay whole on every rank")

    @contextmanager
    def gradient_sync(self, trainer: nn.Module, enabled: bool):
        """Reduce gradients over the ranks in this backward (the last micro-batch of a step) or not."""
        if not self.grouped or enabled:
            yield
        elif self.strategy == "ddp":
            with trainer.no_sync():
                yield
        else:
            trainer.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                trainer.set_requires_gradient_sync(True)

    @contextmanager
    def whole_adapter(self, model: nn.Module):
        """While inside, rank 0's ``model`` holds its trainable parameters whole (FSDP2 shards are
        all-gathered; only the adapter's, never the base's), for writing the PEFT adapter files. Every
        rank must enter it; outside FSDP it changes nothing."""
        from torch.distributed.tensor import DTensor

        swapped = []
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.requires_grad and isinstance(param, DTensor):
                    whole = param.full_tensor()
                    if self.is_main:
                        module._parameters[name] = nn.Parameter(whole.detach(), requires_grad=True)
                        swapped.append((module, name, param))
        try:
            yield
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param

    def close(self) -> None:
        if self.grouped and dist.is_initialized():
            dist.destroy_process_group()


def launched_world() -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` as torchrun set them, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as err:
        raise DistributedError(f"bad launch environment ({err}): RANK and WORLD_SIZE must be set together, as "
                               "torchrun sets them; start the run with torchrun or loraforge train --nproc N") from None


def init_world(strategy: str, timeout_s: float) -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA) and pick this rank's device.

    Raises:
        DistributedError: launched on several processes with ``train.distributed: none``.
    """
    launched = launched_world()
    cuda = torch.cuda.is_available()
    if launched is None or launched[1] == 1:
        return World(strategy, device=torch.device("cuda" if cuda else "cpu"))
    rank, size, local_rank = launched
    if strategy == "none":
        raise DistributedError(f"this process is rank {rank} of {size} (launched by torchrun), but "
                               "train.distributed is none; set train.distributed: ddp or fsdp to train on several "
                               "processes, or launch one process")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=device if cuda else None)
    return World(strategy, rank, size, device)


def is_lost_peer(err: BaseException) -> bool:
    """Whether ``err`` from a collective means that another rank is gone: torch's ``DistError`` (NCCL,
    the store, timeouts) or gloo's transport errors, which are plain RuntimeErrors naming gloo."""
    return isinstance(err, dist.DistError) or "gloo" in str(err).lower()


def quantized_storage_as_parameters(model: nn.Module) -> int:
    """Re-register the packed tensors of every quantized weight format (``quant.base.QuantLinear.qweight``:
    codes, scales, nested constants) as frozen parameters, so that FSDP2 shards them with the other
    weights; 0-d constants stay buffers (FSDP2 shards no scalars). The formats read them by attribute,
    so they work unchanged. Returns how many tensors were moved."""
    from loraforge.quant.base import QuantLinear

    moved = 0
    for layer in model.modules():
        if not isinstance(layer, QuantLinear):
            continue
        for storage in layer.qweight.modules():
            for name, tensor in list(storage._buffers.items()):
                if tensor is None or tensor.ndim == 0:
                    continue
                del storage._buffers[name]
                storage.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
                moved += 1
    return moved


def total_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Clip the gradients to ``max_norm`` (None or 0: measure only) by their norm over every rank, and
    return that norm. Under FSDP2 the gradients are DTensor shards whose norm torch reduces over the
    mesh; under DDP they are already all-reduced, so the local norm is the global one."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)

