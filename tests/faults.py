"""The cnnlab command line with one fault injected, for tests that need a failure no real machine gives on cue.

CNNLAB_FAULT=checkpoint-enospc:N  python tests/faults.py train ...
    the N-th checkpoint write fails with "No space left on device" after its first chunk
CNNLAB_FAULT=nan-loss:S1,S2,...   python tests/faults.py train ...
    the training loss is NaN at these steps (counted from 1), through fit's loss_fn argument
CNNLAB_FAULT=nan-grad:S1,S2,...   python tests/faults.py train ...
    the loss is finite but its gradient NaN at these steps
CNNLAB_FAULT=readonly-cache       python tests/faults.py data fetch ...
    every write under $CNNLAB_CACHE fails with "Read-only file system"
CNNLAB_FAULT=stall-step:S:PART    python tests/faults.py train ...
    step S stops inside its loss (PART=loss) or its backward pass (PART=backward), prints
    "fault: stalled in step S (PART)" on stderr and waits there, for a test to kill it mid-step
"""

from __future__ import annotations

import builtins
import errno
import os
import sys
from pathlib import Path


def checkpoint_enospc(n: int) -> None:
    from cnnlab import files  # checkpoints are written by files.save_atomic, through files.write_durably

    original, calls = files.write_durably, [0]

    def failing(fd, data, on_first_chunk=None):
        if on_first_chunk is not None:  # a checkpoint, not some other file
            calls[0] += 1
            if calls[0] == n:
                os.write(fd, data[: len(data) // 2])
                os.close(fd)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(fd, data, on_first_chunk)

    files.write_durably = failing


def _identity_with_backward(on_backward):
    """The identity going forward; `on_backward(grad)` decides what flows back."""
    import torch

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return on_backward(grad)

    return Identity.apply


def nan_loss(steps: set[int], in_gradient: bool = False):
    """A loss function for `cnnlab.fit(loss_fn=...)`: the usual loss, NaN (or with a NaN gradient) at `steps`."""
    import torch

    from cnnlab.training.trainer import cross_entropy

    usual, calls = cross_entropy(0.1), [0]

    nan_gradient = _identity_with_backward(lambda grad: grad * torch.nan)

    def loss(logits, labels):
        calls[0] += 1
        if calls[0] in steps and in_gradient:
            return usual(nan_gradient(logits), labels)
        value = usual(logits, labels)
        return value * torch.nan if calls[0] in steps else value

    return loss


def stall_in_step(step: int, part: str):
    """A loss function for `cnnlab.fit(loss_fn=...)`: the usual loss, except that step `step` (counted from 1)
    stops inside its loss or its backward pass, says so, and sleeps until it is killed."""
    import time

    from cnnlab.training.trainer import cross_entropy

    usual, calls = cross_entropy(0.1), [0]

    def stall():
        print(f"fault: stalled in step {step} ({part})", file=sys.stderr, flush=True)
        time.sleep(600)

    def stall_then_pass(grad):  # the backward pass stops here, before any parameter has its gradient
        stall()
        return grad

    stall_backward = _identity_with_backward(stall_then_pass)

    def loss(logits, labels):
        calls[0] += 1
        if calls[0] == step and part == "loss":
            stall()
        if calls[0] == step and part == "backward":
            logits = stall_backward(logits)
        return usual(logits, labels)

    return loss


def readonly_cache() -> None:
    cache = Path(os.environ["CNNLAB_CACHE"]).resolve()

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(cache)
        except (TypeError, ValueError):
            return False

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.isdir(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    builtins.open, os.open, os.mkdir = guarded_open, guarded_os_open, guarded_mkdir


if __name__ == "__main__":
    kind, _, arg = os.environ["CNNLAB_FAULT"].partition(":")
    fit_options = {}
    if kind == "checkpoint-enospc":
        checkpoint_enospc(int(arg))
    elif kind == "nan-loss":
        fit_options["loss_fn"] = nan_loss({int(s) for s in arg.split(",")})
    elif kind == "nan-grad":
        fit_options["loss_fn"] = nan_loss({int(s) for s in arg.split(",")}, in_gradient=True)
    elif kind == "stall-step":
        step, _, part = arg.partition(":")
        fit_options["loss_fn"] = stall_in_step(int(step), part)
    elif kind == "readonly-cache":
        readonly_cache()
    else:
        raise SystemExit(f"unknown fault {kind!r}")
    from cnnlab.cli import main

    sys.exit(main(sys.argv[1:], fit_options=fit_options))
