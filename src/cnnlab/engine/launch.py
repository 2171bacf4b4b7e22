"""`cnnlab train --nproc-per-node N`: several training processes on this machine through torchrun."""
from __future__ import annotations

import sys

__all__ = ["hand_over_to_torchrun"]


def hand_over_to_torchrun(args, train_config) -> int:
    """`cnnlab train --nproc-per-node N ...` is `torchrun --standalone --nproc-per-node N -m cnnlab train ...`,
    with the run folder chosen here so that workers restarted after a failure find it."""
    from torch.distributed.run import main as torchrun

    from .run_folder import default_run_dir

    argv = list(args.argv)
    drop = {"--nproc-per-node", "--max-restarts"}
    rest, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in drop:
            i += 1 if "=" in argv[i] else 2
            continue
        rest.append(argv[i])
        i += 1
    if not args.resume and not args.run_dir:
        cfg = train_config(args)
        rest += ["--run-dir", str(default_run_dir(cfg.runs_root, cfg.model, cfg.dataset))]
    launcher = ["--standalone", f"--nproc-per-node={args.nproc_per_node}", f"--max-restarts={args.max_restarts}",
                "-m", "cnnlab", *rest]
    print(f"torchrun {' '.join(launcher)}", file=sys.stderr)
    try:
        torchrun(launcher)
    except Exception as exc:  # torchrun's ChildFailedError lists each failed rank and its exit code
        if hasattr(exc, "sigval"):  # the agent itself was signalled: the workers checkpointed and stopped
            return 128 + int(exc.sigval)
        failures = getattr(exc, "failures", {})
        codes = sorted({f.exitcode for f in failures.values()}) if failures else [1]
        print(f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
              file=sys.stderr)
        return next((c for c in codes if c in (130, 143)), 1)
    return 0
