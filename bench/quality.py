"""Quality benchmark (not a test): train the demo configuration for a fixed budget, generate, evaluate.

    python bench/quality.py                                    # demo defaults, 6 + 4 minutes of training
    python bench/quality.py --stage1_epochs 100 --stage2_epochs 200 --num_samples 16
    python bench/quality.py --size 96 --subjects 64 --stage1_minutes 30 --stage2_minutes 30 --amp true   # on a GPU

Each run works in its own folder (``--workdir``, default ``bench/runs/quality_<time>``: data, weights, outputs), so
nothing in ``models/`` or ``outputs/`` is touched. It prints one line per metric: the generated set, the
real-vs-real floor and the two ceilings (blurred real, noise), all measured in this run, and writes them to
``quality.json`` in the work folder. Compare two code versions by running both with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def run_workflow(config_file: str | list[str], minutes: float | None = None, **overrides: Any) -> None:
    """One bundle workflow in this process; with ``minutes``, training stops (with its checkpoint) at that time."""
    from ignite.engine import Events
    from ignite.handlers import TimeLimit
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=config_file, meta_file="configs/metadata.json",
                              logging_file="configs/logging.conf", workflow_type=None, **overrides)
    workflow.initialize()
    if minutes:
        workflow.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.ITERATION_COMPLETED, TimeLimit(limit_sec=int(minutes * 60)))
    workflow.run()
    workflow.finalize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1_epochs", type=int, default=100)
    p.add_argument("--stage2_epochs", type=int, default=200)
    p.add_argument("--stage1_minutes", type=float, default=6.0, help="training time limit; 0 for epochs only")
    p.add_argument("--stage2_minutes", type=float, default=4.0, help="training time limit; 0 for epochs only")
    p.add_argument("--num_samples", type=int, default=8)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--size", type=int, default=64, help="demo volume side (voxels)")
    p.add_argument("--subjects", type=int, default=24, help="demo subjects (4 validation and 4 test among them)")
    p.add_argument("--amp", default="false", help="bfloat16 autocast (GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    os.chdir(BUNDLE_ROOT)
    sys.path.insert(0, str(BUNDLE_ROOT))
    work = Path(args.workdir or BUNDLE_ROOT / "bench" / "runs" / f"quality_{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    data = work / "data"
    common = {"demo_data_dir": str(data), "dataset_dir": str(data), "ckpt_dir": str(work / "models"),
              "output_dir": str(work / "outputs"), "demo_size": args.size, "volume_size": [args.size] * 3,
              "infer_patch_size": [args.size] * 3, "demo_num_subjects": args.subjects, "seed": args.seed}
    times = {}
    t = time.time()
    run_workflow("configs/train_autoencoder.json", args.stage1_minutes, max_epochs=args.stage1_epochs,
                 amp=args.amp == "true", **common)
    times["stage 1"] = time.time() - t
    t = time.time()
    run_workflow(["configs/train_autoencoder.json", "configs/train_diffusion.json"], args.stage2_minutes,
                 max_epochs=args.stage2_epochs, amp=args.amp == "true", latent_cache_dir=str(work / "cache"), **common)
    times["stage 2"] = time.time() - t
    t = time.time()
    run_workflow("configs/inference.json", num_samples=args.num_samples, sampler=args.sampler,
                 **{k: v for k, v in common.items() if k != "seed"})
    times["generation"] = time.time() - t
    generated = max((work / "outputs").glob("generated_*"))
    t = time.time()
    run_workflow("configs/evaluate.json", generated_dir=str(generated), **common)
    times["evaluation"] = time.time() - t
    folder = max((work / "outputs").glob("evaluation_*"))
    result = json.loads((folder / "metrics.json").read_text())
    rows = result["rows"]
    summary = {"arguments": vars(args), "minutes": {k: round(v / 60, 2) for k, v in times.items()},
               "metrics": {m: {row: rows[row][m] for row in ("generated", "real (floor)", "blurred real", "noise")}
                           for m in rows["generated"]},
               "memorisation": {k: v for k, v in result.get("memorisation", {}).items() if not isinstance(v, list)},
               "report": str(folder / "report.md")}
    (work / "quality.json").write_text(json.dumps(summary, indent=2))
    took = ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
    print(f"\nquality benchmark ({took}); report: {folder}/report.md")
    print(f"{'metric':<28}{'generated':>12}{'real floor':>12}{'blurred':>12}{'noise':>12}")
    for metric, values in summary["metrics"].items():
        rows = ("generated", "real (floor)", "blurred real", "noise")
        print(f"{metric:<28}" + "".join(f"{values[r]:12.4f}" for r in rows))
    memo = summary["memorisation"]
    if memo:
        print(f"{'nearest-training MS-SSIM':<28}{memo['max_generated_to_training']:12.4f}"
              f"{memo['max_real_to_nearest_real']:12.4f}   (max; generated vs real-to-real)")
    return summary


if __name__ == "__main__":
    main()
