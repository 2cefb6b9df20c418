"""The human-readable evaluation report: ``report.md`` with PNG figures beside it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.storage import atomic_write
from scripts.visualize import _pyplot, montage, plot_curves

__all__ = ["read_run_curves", "write_report"]

LOWER_IS_BETTER = ("FID", "MMD", "histogram W1")


def read_run_curves(run: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Scalar curves of a training run folder: its TensorBoard events (every scalar tag), else ``loss_curves.json``."""
    run = Path(run)
    curves: dict[str, list[tuple[float, float]]] = {}
    events = sorted(run.glob("events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        for event_file in events:
            acc = EventAccumulator(str(event_file))
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                curves.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    elif (run / "loss_curves.json").is_file():
        import json

        curves = {k: [tuple(p) for p in v] for k, v in json.loads((run / "loss_curves.json").read_text()).items()}
    if not curves:
        raise FileNotFoundError(f"runs: '{run}' holds no TensorBoard events or loss_curves.json; give a training "
                                "run folder (outputs/train_*_<time>).")
    return {k: sorted(v) for k, v in curves.items()}


def _histograms(path: Path, sets: Mapping[str, Sequence[torch.Tensor]]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, vols in sets.items():
        values = torch.cat([v.flatten() for v in vols]).numpy()
        ax.hist(values[values > 0.05], bins=80, range=(0, 1), density=True, histtype="step", label=name)
    ax.set_xlabel("intensity (above 0.05)")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def _known_truth(path: Path, truth: Mapping[str, Any]) -> None:
    plt = _pyplot()
    quantities = list(truth["wasserstein"])
    fig, axes = plt.subplots(1, len(quantities), figsize=(3 * len(quantities), 3.2), squeeze=False)
    for ax, q in zip(axes[0], quantities, strict=True):
        groups = {"generated": [e[q] for e in truth["estimated"]["generated"]],
                  "real (est.)": [e[q] for e in truth["estimated"]["real (floor)"]],
                  "real (recorded)": [r[q] for r in truth["recorded_reference"]]}
        for x, values in enumerate(groups.values()):
            ax.scatter(np.full(len(values), x) + np.linspace(-0.15, 0.15, len(values)), values, s=12)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(list(groups), rotation=30, fontsize=7)
        ax.set_title(q, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def _table(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    metrics = list(next(iter(rows.values())))
    lines = ["| set | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for row, values in rows.items():
        cells = [f"{values[m]:.4f}" if m in values else "" for m in metrics]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def write_report(folder: Path, result: Mapping[str, Any], generated: Sequence[torch.Tensor],
                 real: Sequence[torch.Tensor], training: Sequence[torch.Tensor] | None,
                 runs: Sequence[str] = ()) -> Path:
    """Write ``report.md`` and its figures (``samples.png``, ``histograms.png``, ``nearest.png``,
    ``known_truth.png``, ``loss_curves_<i>.png``) into ``folder``; returns the report's path."""
    folder = Path(folder)
    n = min(4, len(generated), len(real))
    montage([(f"generated {i}", generated[i]) for i in range(n)] + [(f"real {i}", real[i]) for i in range(n)],
            folder / "samples.png", title="generated (top) and real (bottom) mid-slices")
    _histograms(folder / "histograms.png", {"generated": generated, "real": real})
    name = result["feature_extractor"]
    lines = [
        "# Evaluation of generated volumes", "",
        (f"{result['num_volumes']['generated']} generated volumes against the second half of the real split "
        f"({result['num_volumes']['real (reference)']} volumes, the reference). `real (floor)` is the first half of "
        "the real split: what a perfect generator scores at this sample size. `blurred real` and `noise` are what "
        "poor generators score. Lower is better for FID, MMD and histogram W1; precision and recall are best at 1; "
        "MS-SSIM diversity (mean over pairs within a set) should match the real sets': higher means less diverse."),
        "",
        f"Features: **{name}**." + (" These numbers are not comparable with published FIDs, which use a "
                                     "pretrained network." if name == "random features" else ""),
        "", *_table(result["rows"]), "",
        "![samples](samples.png)", "", "![intensity histograms](histograms.png)", "",
    ]
    memo = result.get("memorisation")
    if memo and training is not None:
        pairs = sorted(memo["generated_nearest_training"], key=lambda p: -p["ms_ssim"])[:3]
        montage([row for p in pairs
                 for row in ((f"generated {p['index']}", generated[p["index"]]),
                             (f"training {p['nearest']} ({p['ms_ssim']:.3f})", training[p["nearest"]]))],
                folder / "nearest.png", title="closest generated/training pairs (MS-SSIM)")
        lines += ["## Memorisation", "",
                  (f"Highest MS-SSIM of a generated volume to its nearest training volume: "
                  f"**{memo['max_generated_to_training']:.4f}**; between distinct real subjects the nearest-neighbour "
                  f"MS-SSIM is {memo['mean_real_to_nearest_real']:.4f} on average (max "
                  f"{memo['max_real_to_nearest_real']:.4f}). A generated volume well above that level is likely a "
                  "copy."),
                  "", "![closest pairs](nearest.png)", ""]
    truth = result.get("known_truth")
    if truth:
        _known_truth(folder / "known_truth.png", truth)
        lines += ["## Known truth (demo phantom)", "",
                  ("A threshold segmentation inside the head (`scripts/evaluation/known_truth.py`) estimates each "
                  "quantity; the table gives the Wasserstein-1 distance of the estimates to the reference subjects' "
                  "recorded values, for the generated set and for real volumes (the segmentation's own error)."), "",
                  "| quantity | generated | real (floor) | generated mean | recorded mean |", "|---|---|---|---|---|"]
        for q, v in truth["wasserstein"].items():
            lines.append(f"| {q} | {v['generated']:.2f} | {v['real (floor)']:.2f} | {v['generated mean']:.2f} | "
                         f"{v['real recorded mean']:.2f} |")
        lines += ["", "![known truth](known_truth.png)", ""]
    control = result.get("control")
    if control:
        lines += ["## Control check (conditional generation)", "",
                  ("Each generated volume was asked for the values in its manifest entry; the generation's control "
                  "check measured them on the volume (`scripts/evaluation/control.py`). MAE is in the condition's "
                  "units and as a percentage of its training range; exact-match is the fraction of integer requests "
                  "(counts) met exactly."), "",
                  "| condition | n | MAE | MAE (% of range) | exact-match |", "|---|---|---|---|---|"]
        for name, c in control.items():
            percent = f"{c['mae_percent_of_range']:.1f}" if "mae_percent_of_range" in c else ""
            exact = f"{c['exact_match']:.2f}" if "exact_match" in c else ""
            lines.append(f"| {name} | {c['n']} | {c['mae']:.3f} | {percent} | {exact} |")
        lines.append("")
    for i, run in enumerate(runs):
        curves = read_run_curves(run)
        plot_curves(curves, folder / f"loss_curves_{i}.png", title=Path(run).name)
        lines += [f"## Training curves: {Path(run).name}", "", f"![curves](loss_curves_{i}.png)", ""]
    path = folder / "report.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return path
