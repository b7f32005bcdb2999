"""Data-parallel training processes (torchrun, DDP): joining, agreeing, leaving, and never hanging.

Every collective waits for all processes, so a process that stops alone (an error, a non-finite loss, a signal)
would leave the others blocked. The rules here: a phase that can fail runs inside `agree_on_errors`, which every
process reaches whether or not its own part failed, and then all stop with the failing process's message; the
per-iteration flags (non-finite loss, a stop signal) are combined in one small all-reduce so every process takes
the same branch at the same iteration. The group's timeout covers the longest wait a process legitimately has:
the others wait while process 0 computes (and caches) the proposals.
"""

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from detector.errors import InputError


class Group:
    """This process's place among the data-parallel ones (world 1: a single process, and no collectives)."""

    def __init__(self, device: torch.device, timeout_minutes: float):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=timeout_minutes))

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree_on_errors(self, error: str | None) -> None:
        """Every process reports its error (None: none); if any failed, all raise InputError naming it."""
        errors = [error]
        if self.world > 1:
            errors = [None] * self.world
            dist.all_gather_object(errors, error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            raise InputError(message if self.world == 1 else f"process {rank} of {self.world}: {message}")

    def rank0_first(self, fn):
        """fn() on process 0, then on the others (which then read what process 0 cached); an error anywhere ends
        every process with its message. A bug (not an InputError) is re-raised where it happened, traceback kept."""
        result = None
        for turn in (True, False):
            error, bug = None, None
            if self.main == turn:
                try:
                    result = fn()
                except InputError as e:
                    error = str(e)
                except Exception as e:  # noqa: BLE001 - reported to the others, then re-raised here
                    error, bug = f"{type(e).__name__}: {e}", e
            if bug is not None and self.world == 1:
                raise bug
            try:
                self.agree_on_errors(error)
            except InputError:
                if bug is not None:
                    raise bug
                raise
        return result

    def flags(self, nonfinite: bool, signal_number: int) -> tuple[list[int], int]:
        """(ranks whose loss is not finite, the stop signal any process received or 0), the same on every process."""
        if self.world == 1:
            return ([0] if nonfinite else []), signal_number
        t = torch.zeros(self.world + 1, dtype=torch.float64)
        t[self.rank] = float(nonfinite)
        t[self.world] = float(signal_number)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [r for r in range(self.world) if t[r] > 0], int(t[self.world])

    def gather(self, obj) -> list:
        """obj of every process, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def check_replicas(self, model: torch.nn.Module) -> None:
        """DDP must keep every process's weights identical; a divergence means a bug, so it stops the run."""
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat)
        for r, other in enumerate(gathered):
            if not torch.equal(other, flat):
                raise RuntimeError(f"DDP replicas diverged: rank {r} differs by {(other - flat).abs().max():.3g}")

    def close(self) -> None:
        """Leave the group (`with Group(...)` does it on the way out). The DDP wrapper must be gone by then: its
        reducer holds the group and gloo's worker threads, and left to interpreter shutdown its teardown can abort
        the process ("terminate called without an active exception"); and every process must be done with the
        group before anyone destroys it."""
        if self.world > 1 and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
