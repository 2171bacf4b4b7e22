"""Copy a finished run's weights into the package and record them in src/cnnlab/weights/registry.json.

    python tools/package_weights.py RUN_DIR NAME --command "cnnlab train ... --seed 0 --no-report" [--commit SHA]

The entry takes its figures from the run's own summary.json (test accuracy, test-time augmentation, precision,
seconds, CPU, threads, torch version) and the file's sha256, which `cnnlab` checks whenever it loads the file.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shlex
import shutil
import sys
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "cnnlab" / "weights"
MAX_BYTES = 2_000_000  # issue 14.3: each packaged file under 2 MB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name", help="<model>-<dataset>, e.g. resnet20-cifar10")
    parser.add_argument("--command", required=True, help="the exact command that trained the run")
    parser.add_argument("--commit", default="", help="git commit of the code that trained it")
    args = parser.parse_args(argv)

    run = args.run_dir
    summary = json.loads((run / "summary.json").read_text())
    meta = json.loads((run / "model.json").read_text())
    weights = run / "model.safetensors"
    words = shlex.split(args.command)
    if f"{meta['model']}-{meta['dataset']}" != args.name:
        sys.exit(f"{run} holds {meta['model']} on {meta['dataset']}; name it {meta['model']}-{meta['dataset']}")
    if "--seed" not in words or int(words[words.index("--seed") + 1]) != summary["seed"]:
        sys.exit(f"the command must name the run's seed: --seed {summary['seed']}")
    if weights.stat().st_size >= MAX_BYTES:
        sys.exit(f"{weights}: {weights.stat().st_size:,} bytes, over the {MAX_BYTES:,} allowed in the package")

    WEIGHTS.mkdir(exist_ok=True)
    shutil.copyfile(weights, WEIGHTS / f"{args.name}.safetensors")
    shutil.copyfile(run / "model.json", WEIGHTS / f"{args.name}.json")
    trained = datetime.datetime.fromtimestamp(weights.stat().st_mtime, datetime.timezone.utc)
    entry = {
        "name": args.name,
        "model": meta["model"],
        "dataset": meta["dataset"],
        "file": f"{args.name}.safetensors",
        "sha256": _sha256(WEIGHTS / f"{args.name}.safetensors"),
        "sidecar": f"{args.name}.json",
        "sidecar_sha256": _sha256(WEIGHTS / f"{args.name}.json"),
        "bytes": weights.stat().st_size,
        "test_accuracy": summary["test_accuracy"],
        "tta": summary["test_tta"],
        "precision": summary["precision"],
        "precision_reason": summary["precision_reason"],
        "command": args.command,
        "seed": summary["seed"],
        "epochs": summary["epochs"],
        "train_seconds": round(summary["train_seconds"], 1),
        "wall_seconds": round(summary["wall_seconds"], 1),
        "cpu": summary["device"],
        "threads": summary["threads"],
        "torch": summary["versions"]["torch"],
        "cnnlab": summary["versions"]["cnnlab"] + (f" ({args.commit})" if args.commit else ""),
        "trained": trained.strftime("%Y-%m-%d"),
        "data": {
            "source": summary["dataset"]["source"],
            "verified": summary["dataset"]["verified"],
            "files": {Path(f["file"]).name: f["sha256"] for f in summary["dataset"]["files"]},
        },
        "note": "timed on a 2-core machine shared with other jobs: the seconds are indicative only",
    }
    registry_path = WEIGHTS / "registry.json"
    registry = json.loads(registry_path.read_text()) if registry_path.is_file() else {"format": 1, "weights": []}
    registry["weights"] = [e for e in registry["weights"] if e["name"] != args.name] + [entry]
    registry["weights"].sort(key=lambda e: e["name"])
    registry_path.write_text(json.dumps(registry, indent=2) + "\n")
    print(
        f"{args.name}: {entry['test_accuracy']:.4f} test accuracy, {entry['bytes']:,} bytes, sha256 "
        f"{entry['sha256'][:12]}… -> {registry_path}"
    )
    return 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
