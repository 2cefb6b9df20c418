"""Label-map control benchmark (not a test): how well images synthesised from label maps follow them, against the
floor the measurement itself allows.

    python bench/controlnet.py --model_dir models --data_dir data/demo                # after train_controlnet.json
    python bench/controlnet.py --model_dir models --data_dir data/demo --scales 0,0.5,1,2 --split test --samples 2

For each ControlNet ``conditioning_scale`` in ``--scales``, synthesises ``--samples`` images from every label map of
the datalist split (``configs/inference_controlnet.json``, rectified flow / the record's sampler) and reads the
control check of each output from the manifest: per class, the Dice between the requested map and the known-truth
segmentation (:mod:`scripts.evaluation.known_truth`) of the generated image. The floor is the same segmentation run
on the real image of each map against its own label. Also the lesion-vs-brain contrast inside the requested lesion
masks (mean intensity in the lesions / mean intensity of the brain - 1), generated and real.

Writes ``controlnet.json``, ``controlnet.md`` (the table) and ``controlnet.png`` (Dice per class against the scale,
the real floor dashed) into ``--workdir``; the last lines are ``RESULT <name> <value>`` (at the best scale) and
``RESULT pass <n>/<m>`` for the targets: Dice within 0.1 of the floor for brain and ventricles, lesion contrast
within 20 % of real.
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
CONFIGS = ["configs/common.json", "configs/inference.json", "configs/inference_controlnet.json"]
CLASSES = ("brain", "ventricles", "lesion")


def lesion_contrast(image, label, classes: dict[int, str]) -> float | None:
    """Lesion contrast: mean intensity inside the lesion labels over that of the brain label, minus 1 (0: the
    lesions are invisible; None: no lesion in the map)."""
    import numpy as np

    index = {name: k for k, name in classes.items()}
    image, label = np.asarray(image).reshape(-1), np.asarray(label).reshape(-1)
    lesion, brain = label == index["lesion"], label == index["brain"]
    if not lesion.any() or not brain.any():
        return None
    return float(image[lesion].mean() / max(image[brain].mean(), 1e-6)) - 1.0


def real_floor(items: list[dict], data_dir: Path, classes: dict[int, str]) -> dict[str, Any]:
    """Control check and lesion contrast of the real image of each map against its own label."""
    import numpy as np
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from scripts.controlnet import control_check

    parser = ConfigParser(ConfigParser.load_config_files([str(BUNDLE_ROOT / CONFIGS[0])]))
    image_chain = Compose(parser.get_parsed_content("preprocessing_transforms"))
    label_chain = Compose(parser.get_parsed_content("label_preprocessing_transforms"))
    spacing = [float(s) for s in parser["spacing"]]
    dice: dict[str, list[float]] = {c: [] for c in CLASSES}
    contrast = []
    for item in items:
        image = image_chain({"image": str(data_dir / item["image"])})["image"].numpy()
        label = label_chain({"label": str(data_dir / item["label"])})["label"].numpy()
        for name, values in control_check(image, label, classes, spacing).items():
            dice[name].append(values["dice"])
        c = lesion_contrast(image, label, classes)
        if c is not None:
            contrast.append(c)
    return {"dice": {k: float(np.mean(v)) for k, v in dice.items() if v},
            "lesion_contrast": float(np.mean(contrast)) if contrast else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True, help="folder with the stage-1, stage-2 and ControlNet weights")
    p.add_argument("--data_dir", required=True, help="the demo data folder (datalist.json, images, labels)")
    p.add_argument("--split", default="test")
    p.add_argument("--scales", default="0,0.5,1,2", help="comma-separated ControlNet conditioning scales")
    p.add_argument("--samples", type=int, default=2, help="images per label map")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    os.chdir(BUNDLE_ROOT)
    sys.path.insert(0, str(BUNDLE_ROOT))
    import numpy as np

    from bench.quality import run_workflow
    from scripts.controlnet import label_vocabulary

    work = Path(args.workdir or BUNDLE_ROOT / "bench" / "runs" / f"controlnet_{time.strftime('%Y%m%d-%H%M%S')}")
    work = work.resolve()
    data_dir = Path(args.data_dir).resolve()
    record = json.loads((Path(args.model_dir) / "model_controlnet_record.json").read_text())
    classes = label_vocabulary(record["label_classes"])
    entries = json.loads((data_dir / "datalist.json").read_text())[args.split]
    floor = real_floor(entries, data_dir, classes)
    print(f"real floor on {len(entries)} {args.split} maps: {floor}")
    common = {"dataset_dir": str(data_dir), "demo_data_dir": str(data_dir), "ckpt_dir": str(Path(args.model_dir)),
              "output_dir": str(work / "outputs"), "label_split": args.split, "samples_per_map": args.samples,
              "seed": args.seed}
    if args.steps:
        common["num_inference_steps"] = args.steps
    rows = []
    for scale in [float(s) for s in args.scales.split(",") if s.strip()]:
        t = time.time()
        run_workflow(CONFIGS, conditioning_scale=scale, **common)
        run = max((work / "outputs").glob("synthesis_*"))
        manifest = json.loads((run / "manifest.json").read_text())
        import nibabel as nib

        contrast = []
        for sample in manifest["samples"]:
            image = np.asarray(nib.load(run / sample["image"]).dataobj)
            label = np.asarray(nib.load(run / sample["label"]).dataobj)
            c = lesion_contrast(image, label, classes)
            if c is not None:
                contrast.append(c)
        row = {"scale": scale, "minutes": round((time.time() - t) / 60, 2), "run": str(run),
               "dice": {k: v["mean_dice"] for k, v in manifest["control_check_summary"].items()},
               "lesion_contrast": float(np.mean(contrast)) if contrast else None}
        rows.append(row)
        print(f"conditioning scale {scale}: Dice {row['dice']}, lesion contrast {row['lesion_contrast']}")

    def targets(row: dict) -> dict[str, bool]:
        out = {f"{c}_dice": row["dice"].get(c, 0.0) >= floor["dice"][c] - 0.1 for c in ("brain", "ventricles")}
        real, gen = floor["lesion_contrast"], row["lesion_contrast"]
        out["lesion_contrast"] = bool(real and gen is not None and abs(gen - real) <= 0.2 * abs(real))
        return out

    for row in rows:
        row["targets"] = targets(row)
    best = max(rows, key=lambda r: (sum(r["targets"].values()), sum(r["dice"].values())))
    lines = ["| conditioning scale | " + " | ".join(f"{c} Dice" for c in CLASSES) + " | lesion contrast |"
             " targets met |", "|---" * 6 + "|"]
    for row in rows:
        lines.append(f"| {row['scale']:g} | " + " | ".join(f"{row['dice'].get(c, float('nan')):.3f}" for c in CLASSES)
                     + f" | {row['lesion_contrast'] or float('nan'):.3f} | {sum(row['targets'].values())}/3 |")
    lines.append("| real image vs its own map (floor) | " + " | ".join(f"{floor['dice'][c]:.3f}" for c in CLASSES)
                 + f" | {floor['lesion_contrast'] or float('nan'):.3f} | |")
    table = "\n".join(lines) + "\n"
    work.mkdir(parents=True, exist_ok=True)
    (work / "controlnet.md").write_text(table)
    (work / "controlnet.json").write_text(json.dumps({"arguments": vars(args), "floor": floor, "rows": rows},
                                                     indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    scales = [r["scale"] for r in rows]
    for ax, c in zip(axes[:3], CLASSES, strict=True):
        ax.plot(scales, [r["dice"].get(c, np.nan) for r in rows], marker="o", label="generated vs requested")
        ax.axhline(floor["dice"][c], color="k", ls="--", label="real vs own map")
        ax.set_title(f"{c} Dice", fontsize=9)
        ax.set_xlabel("conditioning scale", fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[3].plot(scales, [r["lesion_contrast"] or np.nan for r in rows], marker="o")
    if floor["lesion_contrast"]:
        axes[3].axhline(floor["lesion_contrast"], color="k", ls="--")
    axes[3].set_title("lesion contrast (lesion / brain - 1)", fontsize=9)
    axes[3].set_xlabel("conditioning scale", fontsize=8)
    axes[3].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(work / "controlnet.png", dpi=90)
    plt.close(fig)
    print(table)
    for c in CLASSES:
        print(f"RESULT {c}_dice {best['dice'].get(c, float('nan')):.4f}")
        print(f"RESULT {c}_dice_floor {floor['dice'][c]:.4f}")
    print(f"RESULT lesion_contrast {best['lesion_contrast'] or float('nan'):.4f}")
    print(f"RESULT lesion_contrast_real {floor['lesion_contrast'] or float('nan'):.4f}")
    print(f"RESULT best_conditioning_scale {best['scale']:g}")
    print(f"RESULT pass {sum(best['targets'].values())}/{len(best['targets'])}")
    return {"floor": floor, "rows": rows}


if __name__ == "__main__":
    main()
