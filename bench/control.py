"""Control benchmark (not a test): does a conditional model generate what it is asked for?

    python bench/control.py --models models --data data/demo --work outputs/control --per_value 8 --scales 0,1,2,4

For a model trained with ``configs/train_diffusion_conditional.json`` on the demo phantoms it asks, at each guidance
scale (the same scale for every condition), for ``--per_value`` samples of each lesion count 0..3, each with a
ventricle volume spread evenly over the training range, through the README's generation command with a condition
table. The control check of each run measures every sample with the known-truth segmentation. Beside it, the same
measurement on the real phantoms (requested = their recorded parameters) gives the floor the measurement allows.

Writes ``control.json``, ``control.md`` (the table) and ``control.png`` into ``--work`` and prints ``RESULT`` lines:
lesion-count exact-match rate (per requested count and overall) and ventricle-volume MAE as a percentage of the
training range.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/common.json", "configs/inference.json", "configs/inference_conditional.json"]


def real_floor(datalist: Path, transform, spacing, vent_range) -> dict:
    """Known-truth measurement on the real phantoms of every split against their recorded parameters."""
    import numpy as np

    from scripts.evaluation import known_truth
    from scripts.evaluation.evaluate import load_real

    content = json.loads(datalist.read_text())
    entries = [e for split in ("training", "validation", "test") for e in content.get(split, [])]
    items = [{"image": str(datalist.parent / e["image"])} for e in entries]
    measured = [known_truth.estimate_quantities(v.numpy()[0], spacing) for v in load_real(items, transform)]
    counts = np.array([e["params"]["lesion_count"] for e in entries])
    exact = np.array([round(m["lesion_count"]) for m in measured]) == counts
    vent = np.array([e["params"]["ventricle_volume_ml"] for e in entries])
    mae = float(np.mean(np.abs(np.array([m["ventricle_volume_ml"] for m in measured]) - vent)))
    return {"n": len(entries), "lesion_exact": float(exact.mean()),
            "lesion_exact_by_count": {int(k): float(exact[counts == k].mean()) for k in sorted(set(counts.tolist()))},
            "ventricle_mae_ml": mae, "ventricle_mae_percent": 100 * mae / (vent_range[1] - vent_range[0])}


def summarise(manifest: dict, vent_range) -> dict:
    import numpy as np

    samples = manifest["samples"]
    counts = np.array([float(s["condition"]["lesion_count"]) for s in samples])
    exact = np.array([round(s["measured"]["lesion_count"]) for s in samples]) == counts
    requested = np.array([float(s["condition"]["ventricle_volume_ml"]) for s in samples])
    mae = float(np.mean(np.abs(np.array([s["measured"]["ventricle_volume_ml"] for s in samples]) - requested)))
    return {"n": len(samples), "lesion_exact": float(exact.mean()),
            "lesion_exact_by_count": {int(k): float(exact[counts == k].mean()) for k in sorted(set(counts.tolist()))},
            "ventricle_mae_ml": mae, "ventricle_mae_percent": 100 * mae / (vent_range[1] - vent_range[0]),
            "measured_lesions_mean": float(np.mean([s["measured"]["lesion_count"] for s in samples])),
            "network_calls_per_step": manifest["network_calls_per_step"],
            "seconds_per_sample": manifest["seconds_per_sample"], "run": manifest.get("run_dir", "")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="models", help="folder of the conditional weights and their record")
    parser.add_argument("--data", default="data/demo", help="demo data folder (its datalist.json)")
    parser.add_argument("--work", default="outputs/control")
    parser.add_argument("--scales", default="0,1,2,4")
    parser.add_argument("--per_value", type=int, default=8, help="samples per requested lesion count")
    parser.add_argument("--counts", default="0,1,2,3")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(BUNDLE_ROOT))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from monai.bundle import ConfigParser, run
    from monai.transforms import Compose

    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    models, data = Path(args.models).absolute(), Path(args.data).absolute()
    record = json.loads((models / "model_record.json").read_text())
    spec = {s["name"]: s for s in record["conditions"]}
    vent_range = (spec["ventricle_volume_ml"]["min"], spec["ventricle_volume_ml"]["max"])
    counts = [int(c) for c in args.counts.split(",")]
    table = work / "conditions.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_count", "ventricle_volume_ml"])
        for k in counts:
            for j in range(args.per_value):
                v = vent_range[0] + (j + 0.5) / args.per_value * (vent_range[1] - vent_range[0])
                writer.writerow([k, round(v, 3)])

    config = ConfigParser()
    config.read_config(str(BUNDLE_ROOT / "configs" / "common.json"))
    transform = Compose(config.get_parsed_content("preprocessing_transforms"))
    spacing = [float(x) for x in record["spacing"]]
    results = {"floor": real_floor(data / "datalist.json", transform, spacing, vent_range), "scales": {}}
    print("RESULT floor", json.dumps(results["floor"]), flush=True)
    import os

    os.chdir(BUNDLE_ROOT)
    for w in [float(s) for s in args.scales.split(",")]:
        out = work / f"scale_{w:g}"
        extra = {} if args.steps is None else {"num_inference_steps": args.steps}
        run(config_file=CONFIGS, meta_file="configs/metadata.json", logging_file="configs/logging.conf",
            model_dir=str(models), load_autoencoder_path=str(models / "model_autoencoder.pt"), output_dir=str(out),
            dataset_dir=str(data), demo_data_dir=str(data), condition_table=str(table), guidance_scale=w,
            batch_size=args.batch_size, seed=args.seed, **extra)
        run_dir = max(out.glob("generated_*"))
        manifest = json.loads((run_dir / "manifest.json").read_text())
        manifest["run_dir"] = str(run_dir)
        results["scales"][f"{w:g}"] = summarise(manifest, vent_range)
        print(f"RESULT scale {w:g}", json.dumps(results["scales"][f"{w:g}"]), flush=True)
        (work / "control.json").write_text(json.dumps(results, indent=2))

    rows = ["| guidance scale | n | lesion exact-match | by count " + " / ".join(map(str, counts))
            + " | measured lesions (mean) | ventricle MAE (ml) | ventricle MAE (% of range) | calls/step | s/sample |",
            "|---|---|---|---|---|---|---|---|---|"]
    for w, r in results["scales"].items():
        by = " / ".join(f"{r['lesion_exact_by_count'].get(k, float('nan')):.2f}" for k in counts)
        rows.append(f"| {w} | {r['n']} | {r['lesion_exact']:.2f} | {by} | {r['measured_lesions_mean']:.2f} | "
                    f"{r['ventricle_mae_ml']:.2f} | {r['ventricle_mae_percent']:.1f} | {r['network_calls_per_step']} | "
                    f"{r['seconds_per_sample']:.1f} |")
    f = results["floor"]
    by = " / ".join(f"{f['lesion_exact_by_count'].get(k, float('nan')):.2f}" for k in counts)
    rows.append(f"| real phantoms (floor) | {f['n']} | {f['lesion_exact']:.2f} | {by} | | "
                f"{f['ventricle_mae_ml']:.2f} | {f['ventricle_mae_percent']:.1f} | | |")
    (work / "control.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))

    scales = [float(w) for w in results["scales"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(scales, [r["lesion_exact"] for r in results["scales"].values()], "o-", label="generated")
    axes[0].axhline(f["lesion_exact"], ls="--", c="gray", label="real phantoms (floor)")
    axes[0].axhline(0.7, ls=":", c="red", label="target")
    axes[0].set(xlabel="guidance scale", ylabel="lesion count exact-match", ylim=(0, 1.05))
    axes[1].plot(scales, [r["ventricle_mae_percent"] for r in results["scales"].values()], "o-", label="generated")
    axes[1].axhline(f["ventricle_mae_percent"], ls="--", c="gray", label="real phantoms (floor)")
    axes[1].axhline(15, ls=":", c="red", label="target")
    axes[1].set(xlabel="guidance scale", ylabel="ventricle volume MAE (% of range)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "control.png", dpi=120)
    return results


if __name__ == "__main__":
    main()
