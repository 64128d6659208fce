"""Processes and devices: torchrun ranks, the device and autocast dtype a run asks for.

Shared by feature extraction (distill/features.py) and distillation (distill/train.py): one
process per GPU under torchrun (NCCL), or several CPU processes (gloo), or just one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from dsmd.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            torch_dist.all_reduce(x)
            x /= self.world
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of every rank, in rank order (all ranks hold equal-sized micro-batches)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        torch_dist.broadcast(t, 0)
        return bool(t.item())

    def on_main(self, fn, device: torch.device):
        """Run `fn` on rank 0 only; if it raises, every rank raises (instead of waiting forever)."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except BaseException as e:  # re-raised below, on every rank
                error = e
        if self.broadcast_flag(error is not None, device):
            raise error if error is not None else RuntimeError("rank 0 failed; its log says why")
        return result


def init_dist(device_kind: str) -> Dist:
    """This process's place among torchrun's (one process, rank 0, when not under torchrun).

    Joins the process group (NCCL on GPUs, gloo on CPUs) unless it is already joined; on
    GPUs each rank takes the GPU of its local rank, so NCCL never sees two ranks on cuda:0.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not torch_dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(d.local_rank)
        torch_dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return d


def close_dist(dist: Dist) -> None:
    """Leave the process group (if one was made), so torchrun's processes exit cleanly."""
    if dist.world > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()



def resolve_device(kind: str) -> str:
    """The device run.device names (auto: cuda when a GPU is visible); cuda without a GPU is an error, not a CPU run."""
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device is cuda but no GPU is visible; use run.device=cpu or auto")
    return kind


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype run.amp asks for on `device` (None: fp32). auto: bf16 on GPUs that have it (else
    fp16) and on CPUs with native bf16 (else fp32, as emulated bf16 is slower)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    if amp in ("bf16", "fp16"):
        if amp == "fp16" and device.type != "cuda":
            raise UserError("run.amp=fp16 needs a GPU; use bf16 or off on CPU")
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise UserError(f"run.amp must be auto, bf16, fp16 or off, not {amp!r}")



def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere autocast is slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False

