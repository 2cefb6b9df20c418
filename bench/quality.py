"""Quality benchmark (not a test): train the demo recipe, generate, evaluate; a compute-to-quality curve.

    python bench/quality.py                                     # demo recipe; stage 2 evaluated after 2, 5, 10 min
    python bench/quality.py --stage2_budgets 2,5,10,20 --num_samples 16
    python bench/quality.py --autoencoder models/model_autoencoder.pt --stage2_budgets 2,4,7   # on the demo's stage 1
    python bench/quality.py --stage1_minutes 0 --stage1_epochs 100 --stage2_budgets 0 --stage2_epochs 200  # epochs
    python bench/quality.py --size 96 --subjects 96 --stage1_minutes 20 --stage2_budgets 5,10,20,30 --amp true  # GPU

One stage 1 is trained (and its test-split reconstruction measured, beside the ceiling a perfect denoising
autoencoder would reach on the same noisy inputs: :func:`reconstruction_ceiling`), then stage 2 is trained on it in
slices. After the first slice the training latents are decoded (:func:`stage1_round_trip`): the floor subjects
through stage 1, evaluated as a generated set, are what a perfect stage 2 on this stage 1 would score (the
``stage-1 round trip`` column, ``RESULT round_trip_*``). After each budget (cumulative training minutes) the run
stops with its checkpoint, generates ``--num_samples`` volumes with the EMA weights, evaluates them
(``configs/evaluate.json``: real-vs-real floor and blurred/noise ceilings measured in the same run), and resumes to
the next budget. The learning-rate schedule is
constant after its warm-up, so a slice boundary changes nothing but the RNG stream. Each run works in its own folder
(``--workdir``, default ``bench/runs/quality_<time>``: data, weights, outputs), never in ``models/`` or
``outputs/``.

Writes ``quality.json`` (every metric at every budget), ``quality.md`` (the table) and ``quality.png`` (each metric
against stage-2 training minutes, with the real-vs-real floor drawn in) into the work folder. The last lines are
``RESULT <metric> <value>`` for the largest budget, then ``RESULT pass <n>/<m>``: how many of the targets of the
demo recipe (:data:`TARGETS`) it meets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
COMMON = "configs/common.json"  # the shared definitions, merged first by every workflow

#: the demo recipe's quality targets: name -> (what, threshold); checked by :func:`check_targets`
TARGETS = {
    "stage1_psnr": "stage-1 test-split reconstruction PSNR >= 27 dB",
    "stage1_ms_ssim": "stage-1 test-split reconstruction MS-SSIM >= 0.93",
    "truth_mean": "known-truth means (head, brain, ventricles, lesion count) within 10 % of the real means",
    "truth_w1": "known-truth Wasserstein distances within 3x the real-vs-real floor",
    "precision": "precision >= 0.5",
    "recall": "recall >= 0.5",
    "diversity": "MS-SSIM diversity within 0.1 of real-vs-real",
    "no_copies": "no sample nearer a training volume than the nearest pair of real training volumes",
}
DERIVED = (" (floor)", " (real)", " (real reference)")  # suffixes of the comparison values in a row
TRUTH = ("head_volume_ml", "brain_volume_ml", "ventricle_volume_ml", "lesion_count")


def run_workflow(config_file: list[str], minutes: float | None = None, **overrides: Any) -> None:
    """One bundle workflow in this process (``config_file``: :data:`COMMON` first, then the workflow config); with
    ``minutes``, training stops (with its checkpoint) at that time."""
    from ignite.engine import Events
    from ignite.handlers import TimeLimit
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=config_file, meta_file="configs/metadata.json",
                              logging_file="configs/logging.conf", workflow_type=None, **overrides)
    workflow.initialize()
    if minutes:
        workflow.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.ITERATION_COMPLETED, TimeLimit(limit_sec=max(1, int(minutes * 60))))
    workflow.run()
    workflow.finalize()


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """``--set ID=JSON`` pairs as config overrides; a value that is not JSON is taken as a string."""
    overrides: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set expects ID=VALUE (e.g. latent_channels=8), got '{item}'.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def newest(folder: Path, prefix: str) -> Path:
    return max(folder.glob(f"{prefix}_*"))


def quality_row(evaluation: Mapping) -> dict[str, float]:
    """The flat metrics of one evaluation's ``metrics.json``: generated and floor values, known-truth figures."""
    rows = evaluation["rows"]
    row: dict[str, float] = {}
    for metric, value in rows["generated"].items():
        row[metric] = value
        row[f"{metric} (floor)"] = rows["real (floor)"][metric]
    row["MS-SSIM diversity (real reference)"] = rows["real (reference)"]["MS-SSIM diversity"]
    memo = evaluation.get("memorisation", {})
    if memo:
        row["nearest-training MS-SSIM"] = memo["max_generated_to_training"]
        row["nearest-training MS-SSIM (floor)"] = memo["max_real_to_nearest_real"]
    for q, values in evaluation.get("known_truth", {}).get("wasserstein", {}).items():
        row[f"{q} W1"] = values["generated"]
        row[f"{q} W1 (floor)"] = values["real (floor)"]
        row[f"{q} mean"] = values["generated mean"]
        row[f"{q} mean (real)"] = values["real recorded mean"]
    return row


def reconstruction_ceiling(reconstruction_dir: Path, data_dir: Path, draws: int = 32) -> dict[str, float]:
    """What a perfect denoising autoencoder would score on the demo's test split: the PSNR, SSIM and MS-SSIM of each
    subject's expected image given its noise-free phantom (``E[clip(a |x + n| + b, 0, 1)]``, Rician noise of the
    subject's sigma, by ``draws`` Monte-Carlo draws, in the preprocessed intensities ``a * raw + b`` that the metrics
    use, fitted on the written input) against the input the reconstruction metrics compared with. An autoencoder
    cannot reproduce the noise it compresses away, so its test-split figures stay below these.
    """
    import nibabel as nib
    import numpy as np
    import torch

    from scripts.demo_data import make_subject
    from scripts.reconstruction import volume_metrics

    datalist = json.loads((data_dir / "datalist.json").read_text())
    generator = datalist["generator"]
    rows = []
    for item in datalist["test"]:
        index = int(item["subject"].rsplit("_", 1)[1])
        raw = np.asarray(nib.load(data_dir / item["image"]).dataobj, dtype=np.float64)
        written = np.asarray(nib.load(reconstruction_dir / f"{item['subject']}_input.nii.gz").dataobj, dtype=np.float64)
        if written.shape != raw.shape:
            raise ValueError(f"the ceiling needs the demo volumes on their own grid; {item['image']} is {raw.shape}, "
                             f"its preprocessed input {written.shape}.")
        inside = (written > 1e-3) & (written < 1 - 1e-3)  # the affine part of the percentile scaling, not its clip
        a, b = np.polyfit(raw[inside], written[inside], 1)
        clean, _, params = make_subject(np.random.default_rng([generator["seed"], index]), generator["size"],
                                        generator["spacing"], noise=False)
        sigma, rng = params["noise_sigma"], np.random.default_rng(index)
        expected = np.zeros_like(raw)
        for _ in range(draws):
            real, imaginary = (sigma * rng.standard_normal(clean.shape) for _ in range(2))
            magnitude = np.hypot(clean + real, imaginary)
            expected += np.clip(a * magnitude + b, 0.0, 1.0)
        as_tensor = lambda v: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None, None]  # noqa: E731
        rows.append(volume_metrics(as_tensor(expected / draws), as_tensor(written)))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def stage1_round_trip(work: Path, overrides: Mapping[str, Any]) -> tuple[dict[str, float], Path]:
    """What a perfect stage 2 could reach on this stage 1: each training subject's cached latent (the posterior mean
    stage 2 trains on, ``work/cache``) decoded as generation decodes (``inference.json#decode_inferer``).

    Returns the known-truth accuracy of the decoded training set against its recorded ``params``
    (:func:`~scripts.evaluation.known_truth.accuracy`: ``<volume> relative error``, ``lesion_count_exact``, and the
    decoded and recorded means), and a folder holding the decoded volumes of the first half of the training split as
    NIfTI: the evaluation's floor subjects through stage 1, to be evaluated as a generated set would be.
    """
    import numpy as np
    import torch
    from monai.bundle import ConfigParser

    from scripts.evaluation.known_truth import QUANTITIES, accuracy, estimate_quantities, recorded_quantities
    from scripts.nifti import centered_affine, save_nifti
    from scripts.sampling import decode_latents

    cache = torch.load(max((work / "cache").glob("latents_training_*.pt")), weights_only=True)
    parser = ConfigParser()
    parser.read_config([COMMON, "configs/inference.json"])
    parser.update({**overrides, "latent_shape": list(cache[0]["z_mu"].shape), "scale_factor": 1.0})
    autoencoder = parser.get_parsed_content("autoencoder")
    autoencoder.load_state_dict(torch.load(work / "models" / "model_autoencoder.pt", weights_only=True))
    inferer = parser.get_parsed_content("decode_inferer")
    data_dir = Path(overrides["demo_data_dir"])
    params = {Path(e["image"]).name: e["params"]
              for e in json.loads((data_dir / "datalist.json").read_text())["training"]}
    training = ConfigParser()  # the training geometry (inference.json takes it from a training record)
    training.read_config(COMMON)
    training.update(dict(overrides))
    spacing = [float(x) for x in training.get_parsed_content("spacing")]
    orientation = training.get_parsed_content("orientation")
    folder = work / "outputs" / "round_trip"
    folder.mkdir(parents=True, exist_ok=True)
    estimated, recorded = [], []
    for k, item in enumerate(cache):
        z = item["z_mu"][None].to(next(autoencoder.parameters()).device)
        volume = decode_latents(autoencoder, z, 1.0, inferer)[0, 0].float().cpu().clamp(0, 1).numpy()
        estimated.append(estimate_quantities(volume, spacing))
        recorded.append(recorded_quantities(params[Path(item["source"]).name]))
        if k < len(cache) // 2:  # the evaluation's floor half of the training split
            save_nifti(volume, centered_affine(volume.shape, spacing, orientation),
                       folder / f"round_trip_{k:03d}.nii.gz")
    out = {f"{q} mean": float(np.mean([e[q] for e in estimated])) for q in QUANTITIES}
    out.update({f"{q} mean (real)": float(np.mean([r[q] for r in recorded])) for q in QUANTITIES})
    out.update({(q if q == "lesion_count_exact" else f"{q} relative error"): v
                for q, v in accuracy(estimated, recorded).items()})
    return out, folder


def check_targets(stage1: Mapping[str, float], row: Mapping[str, float]) -> dict[str, bool]:
    """Which of :data:`TARGETS` a run meets (known-truth targets need every quantity of :data:`TRUTH`)."""
    def rel(q: str) -> float:
        return abs(row[f"{q} mean"] - row[f"{q} mean (real)"]) / max(abs(row[f"{q} mean (real)"]), 1e-6)

    has_truth = all(f"{q} W1" in row for q in TRUTH)
    real_diversity = row["MS-SSIM diversity (floor)"]
    return {
        "stage1_psnr": stage1["psnr"] >= 27.0,
        "stage1_ms_ssim": stage1["ms_ssim"] >= 0.93,
        "truth_mean": has_truth and all(rel(q) <= 0.10 for q in TRUTH),
        "truth_w1": has_truth and all(row[f"{q} W1"] <= 3.0 * max(row[f"{q} W1 (floor)"], 1e-6) for q in TRUTH),
        "precision": row["precision"] >= 0.5,
        "recall": row["recall"] >= 0.5,
        "diversity": abs(row["MS-SSIM diversity"] - real_diversity) <= 0.1,
        "no_copies": row.get("nearest-training MS-SSIM", 1.0) <= row.get("nearest-training MS-SSIM (floor)", 0.0),
    }


def plot(curve: list[dict[str, Any]], path: Path, round_trip: Mapping[str, Any] | None = None) -> None:
    """Each metric against stage-2 training minutes, the real-vs-real floor dashed and (with ``round_trip``) the
    floor subjects through stage 1 dotted: what a perfect stage 2 reaches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in curve[0]["metrics"] if f"{m} (floor)" in curve[0]["metrics"]]
    cols = 4
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    minutes = [c["stage2_minutes"] for c in curve]
    for ax, metric in zip(axes.ravel()[: len(metrics)], metrics, strict=True):
        ax.plot(minutes, [c["metrics"][metric] for c in curve], marker="o", label="generated")
        ax.plot(minutes, [c["metrics"][f"{metric} (floor)"] for c in curve], "k--", label="real vs real")
        if round_trip and metric in round_trip["metrics"]:
            ax.axhline(round_trip["metrics"][metric], color="tab:red", linestyle=":", label="stage-1 round trip")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("stage-2 training minutes", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(metrics):]:
        ax.set_axis_off()
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(stage1: Mapping[str, float], curve: list[dict[str, Any]], round_trip: Mapping[str, Any] | None = None
          ) -> str:
    """The markdown table: one column per budget, then (with ``round_trip``) the floor subjects through stage 1,
    then the real-vs-real floor."""
    metrics = [m for m in curve[0]["metrics"] if not m.endswith(DERIVED)]
    extra = " stage-1 round trip |" if round_trip else ""
    head = "| metric | " + " | ".join(f"{c['stage2_minutes']:g} min" for c in curve) + f" |{extra} real vs real |"
    lines = [f"stage 1: {stage1['minutes']:.1f} min, test PSNR {stage1['psnr']:.2f} dB, "
             f"MS-SSIM {stage1['ms_ssim']:.4f} (a perfect denoiser: {stage1['psnr_ceiling']:.2f} dB, "
             f"{stage1['ms_ssim_ceiling']:.4f})",
             ]
    if "round_trip lesion_count mean" in stage1:
        lines.append("stage 1 round trip (the training latents decoded: what a perfect stage 2 reaches): " + ", ".join(
            f"{q} {stage1[f'round_trip {q} mean']:.4g} (real {stage1[f'round_trip {q} mean (real)']:.4g})"
            for q in TRUTH) + f", lesion count exact {stage1['round_trip lesion_count_exact']:.2f}")
    lines += ["", head, "|---" * (len(curve) + 2 + bool(round_trip)) + "|"]
    for m in metrics:
        floor = curve[-1]["metrics"].get(f"{m} (floor)", curve[-1]["metrics"].get(f"{m} (real)"))
        floor_text = f"{floor:.4g}" if floor is not None else ""
        trip = f" {round_trip['metrics'][m]:.4g} |" if round_trip and m in round_trip["metrics"] else (
            " |" if round_trip else "")
        lines.append(f"| {m} | " + " | ".join(f"{c['metrics'][m]:.4g}" for c in curve) + f" |{trip} {floor_text} |")
    passed = [f"{sum(c['targets'].values())}/{len(c['targets'])}" for c in curve]
    trip = f" {sum(round_trip['targets'].values())}/{len(round_trip['targets'])} |" if round_trip else ""
    lines.append("| targets met | " + " | ".join(passed) + f" |{trip} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1_epochs", type=int, default=None, help="default: the config's max_epochs")
    p.add_argument("--stage1_minutes", type=float, default=0.0, help="stage-1 time limit; 0: epochs only")
    p.add_argument("--autoencoder", default=None,
                   help="reuse these stage-1 weights (e.g. the demo's models/model_autoencoder.pt) instead of training")
    p.add_argument("--stage2_epochs", type=int, default=100000, help="stage-2 epoch cap (the budgets stop it)")
    p.add_argument("--stage2_budgets", default="2,5,10",
                   help="cumulative stage-2 training minutes at which to generate and evaluate; 0: one run of "
                        "--stage2_epochs")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--size", type=int, default=None, help="demo volume side (voxels); default: the config's")
    p.add_argument("--subjects", type=int, default=None, help="demo subjects; default: the config's")
    p.add_argument("--amp", default="auto",
                   help="bfloat16 autocast: true, false, or auto (the config's default: on where bf16 is fast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="ID=JSON",
                   help="override a config id in every workflow, the value as JSON (repeatable), e.g. "
                        "--set latent_channels=8 --set 'autoencoder_channels=[32,64,64]'")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    os.chdir(BUNDLE_ROOT)
    sys.path.insert(0, str(BUNDLE_ROOT))
    work = Path(args.workdir or BUNDLE_ROOT / "bench" / "runs" / f"quality_{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    data, outputs = work / "data", work / "outputs"
    common: dict[str, Any] = {"demo_data_dir": str(data), "dataset_dir": str(data), "ckpt_dir": str(work / "models"),
                              "output_dir": str(outputs)}
    if args.size:
        common.update(demo_size=args.size, volume_size=[args.size] * 3)
    if args.subjects:
        common["demo_num_subjects"] = args.subjects
    if args.amp.strip().lower() != "auto":
        common["amp"] = args.amp.strip().lower() in ("true", "1", "yes")
    common.update(parse_settings(args.set))
    t = time.time()
    if args.autoencoder:
        import shutil

        (work / "models").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.autoencoder, work / "models" / "model_autoencoder.pt")
    else:
        stage1_overrides = {"max_epochs": args.stage1_epochs} if args.stage1_epochs else {}
        run_workflow([COMMON, "configs/train_autoencoder.json"], args.stage1_minutes, seed=args.seed,
                     **stage1_overrides, **common)
    stage1_minutes = (time.time() - t) / 60
    run_workflow([COMMON, "configs/inference_autoencoder.json"], **common)
    summary = json.loads((newest(outputs, "reconstruction") / "summary.json").read_text())
    stage1 = {"minutes": stage1_minutes, "psnr": summary["psnr"]["mean"], "ssim": summary["ssim"]["mean"],
              "ms_ssim": summary["ms_ssim"]["mean"]}
    ceiling = reconstruction_ceiling(newest(outputs, "reconstruction"), data)
    stage1.update({f"{k}_ceiling": v for k, v in ceiling.items()})
    print(f"stage 1: {stage1_minutes:.1f} min; test PSNR {stage1['psnr']:.2f} dB, MS-SSIM {stage1['ms_ssim']:.4f} "
          f"(a perfect denoiser: {ceiling['psnr']:.2f} dB, {ceiling['ms_ssim']:.4f})")

    budgets = [float(b) for b in args.stage2_budgets.split(",") if b.strip()] or [0.0]
    stage2 = [COMMON, "configs/train_diffusion.json"]
    curve: list[dict[str, Any]] = []
    trained = 0.0
    for k, budget in enumerate(budgets):
        t = time.time()
        run_workflow(stage2, (budget - trained) if budget else None, max_epochs=args.stage2_epochs,
                     seed=args.seed, latent_cache_dir=str(work / "cache"), resume=k > 0, **common)
        trained += (time.time() - t) / 60
        if k == 0:  # the decoded training latents: what a perfect stage 2 on this stage 1 reaches
            round_trip, folder = stage1_round_trip(work, common)
            stage1.update({f"round_trip {key}": value for key, value in round_trip.items()})
            run_workflow([COMMON, "configs/evaluate.json"], generated_dir=str(folder), **common)
            trip_row = quality_row(json.loads((newest(outputs, "evaluation") / "metrics.json").read_text()))
            round_trip_point = {"metrics": trip_row, "targets": check_targets(stage1, trip_row),
                                "report": str(newest(outputs, "evaluation") / "report.md")}
            print("stage 1 round trip: " + ", ".join(
                f"{q} {round_trip[f'{q} mean']:.3g} (real {round_trip[f'{q} mean (real)']:.3g})" for q in TRUTH))
        t = time.time()
        run_workflow([COMMON, "configs/inference.json"], num_samples=args.num_samples, seed=args.seed, **common)
        generation_minutes = (time.time() - t) / 60
        run_workflow([COMMON, "configs/evaluate.json"], generated_dir=str(newest(outputs, "generated")), **common)
        evaluation = json.loads((newest(outputs, "evaluation") / "metrics.json").read_text())
        row = quality_row(evaluation)
        point = {"stage2_minutes": round(trained, 2), "generation_minutes": round(generation_minutes, 2),
                 "metrics": row, "targets": check_targets(stage1, row),
                 "samples": str(newest(outputs, "generated") / "samples.png"),
                 "report": str(newest(outputs, "evaluation") / "report.md")}
        curve.append(point)
        print(f"stage 2 at {trained:.1f} min: {sum(point['targets'].values())}/{len(TARGETS)} targets; "
              f"samples {point['samples']}")

    result = {"arguments": vars(args), "stage1": stage1, "curve": curve, "round_trip": round_trip_point,
              "targets": TARGETS}
    (work / "quality.json").write_text(json.dumps(result, indent=2))
    (work / "quality.md").write_text(table(stage1, curve, round_trip_point))
    plot(curve, work / "quality.png", round_trip_point)
    print(f"\nquality benchmark: {work}/quality.md, {work}/quality.png")
    print(table(stage1, curve, round_trip_point))
    last = curve[-1]
    print(f"RESULT stage1_psnr {stage1['psnr']:.4f}")
    print(f"RESULT stage1_ms_ssim {stage1['ms_ssim']:.4f}")
    print(f"RESULT stage1_psnr_ceiling {stage1['psnr_ceiling']:.4f}")
    print(f"RESULT stage1_ms_ssim_ceiling {stage1['ms_ssim_ceiling']:.4f}")
    for key, value in stage1.items():
        if key.startswith("round_trip "):
            print(f"RESULT stage1_{key.replace(' ', '_').replace('(', '').replace(')', '')} {value:.6g}")
    for metric, value in round_trip_point["metrics"].items():
        if not metric.endswith(DERIVED):
            print(f"RESULT round_trip_{metric.replace(' ', '_')} {value:.6g}")
    print(f"RESULT round_trip_pass {sum(round_trip_point['targets'].values())}/{len(round_trip_point['targets'])}")
    print(f"RESULT stage2_minutes {last['stage2_minutes']:.2f}")
    for metric, value in last["metrics"].items():
        print(f"RESULT {metric.replace(' ', '_')} {value:.6g}")
    for name, ok in last["targets"].items():
        print(f"RESULT target_{name} {int(ok)}")
    print(f"RESULT pass {sum(last['targets'].values())}/{len(last['targets'])}")
    return result


if __name__ == "__main__":
    main()
