"""Evaluation of generated volumes: each metric on inputs with a known answer, the evaluate.json workflow with its
report, and its refusals. The known-truth segmentation on demo phantoms: tests/test_known_truth.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from scripts.evaluation import known_truth
from scripts.evaluation.evaluate import EvaluationError, evaluate_sets, generated_files
from scripts.evaluation.features import RandomFeatures
from scripts.evaluation.metrics import (
    MSSSIM,
    fid,
    histogram_distance,
    mmd,
    ms_ssim_diversity,
    nearest_neighbours,
    precision_recall,
    wasserstein_1d,
)
from scripts.nifti import centered_affine, save_nifti
from tests.helpers import COMMON, ROOT, overrides_for, run_bundle

EVALUATE = [COMMON, "configs/evaluate.json"]


def _volumes(n: int, seed: int = 0, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(1, size, size, size)
    base[:, 8:24, 8:24, 8:24] = 0.6
    return [(base + 0.1 * torch.rand(base.shape, generator=g)).clamp(0, 1) for _ in range(n)]


def test_fid_and_mmd_known_answers():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(64, 8, generator=g, dtype=torch.float64)
    assert fid(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, 2.0] + [0.0] * 6, dtype=torch.float64)
    assert fid(feats, feats + shift) == pytest.approx(5.0, rel=1e-4)  # ||shift||^2, same covariance
    # linear-kernel MMD per dimension: about ||shift||^2 / 8 for unit-variance features; about 0 for identical sets
    assert abs(mmd(feats, feats)) < 0.05
    assert mmd(feats, feats + shift) == pytest.approx(5.0 / 8, rel=0.25)


def test_precision_recall_known_answers():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(32, 4, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # real data in two far clusters, a generator that covers one: full precision, half the recall
    two_modes = torch.cat([real[:16], real[16:] + 50.0])
    assert precision_recall(two_modes, real[:16].clone()) == (1.0, 0.5)


def test_wasserstein_1d_is_exact_for_samples_of_different_sizes():
    """W1 = integral of |F_a - F_b|. a = {0, 1}, b = {0, 0, 3}: F_a = 1/2, F_b = 2/3 on [0, 1); F_a = 1, F_b = 2/3 on
    [1, 3): 1 x 1/6 + 2 x 1/3 = 5/6 (a mean gap between interpolated quantiles would give 0.55)."""
    assert wasserstein_1d([0.0, 1.0], [0.0, 0.0, 3.0]) == pytest.approx(5 / 6, abs=1e-12)
    assert wasserstein_1d([0.0, 0.0, 3.0], [1.0, 0.0]) == pytest.approx(5 / 6, abs=1e-12)  # symmetric, any order
    assert wasserstein_1d([2.0], [2.0, 2.0, 2.0]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        wasserstein_1d([], [1.0])


def test_histogram_wasserstein_and_diversity_known_answers():
    assert wasserstein_1d([0.0, 1.0], [2.0, 3.0]) == pytest.approx(2.0)
    vols = _volumes(3)
    assert histogram_distance(vols, vols) == pytest.approx(0.0, abs=1e-9)
    assert histogram_distance(vols, [(v + 0.1) for v in vols]) == pytest.approx(0.1, abs=1e-3)
    ms = MSSSIM(kernel_size=3, weights=(0.5, 0.5))
    assert ms_ssim_diversity([vols[0]] * 3, ms) == pytest.approx(1.0, abs=1e-4)  # a collapsed set
    assert ms_ssim_diversity(vols, ms) < 0.999
    matches = nearest_neighbours([vols[2], vols[0]], vols, ms)
    assert [m[0] for m in matches] == [2, 0] and all(m[1] == pytest.approx(1.0, abs=1e-4) for m in matches)


def test_random_features_are_fixed_by_seed():
    vols = _volumes(2)
    a, b, c = RandomFeatures(0).extract(vols), RandomFeatures(0).extract(vols), RandomFeatures(1).extract(vols)
    assert a.shape == (2, 256) and torch.equal(a, b) and not torch.equal(a, c)


def test_evaluate_sets_floor_beats_ceilings():
    real = _volumes(8, seed=1)
    result = evaluate_sets(_volumes(4, seed=2), real, RandomFeatures(0), MSSSIM(kernel_size=3, weights=(0.5, 0.5)),
                           training=real, max_pairs=6)
    rows = result["rows"]
    name = "FID (random features)"
    assert rows["real (floor)"][name] < rows["noise"][name]
    assert rows["real (floor)"]["histogram W1"] < rows["noise"]["histogram W1"]
    assert rows["real (floor)"]["precision"] >= rows["noise"]["precision"]
    assert result["memorisation"]["max_generated_to_training"] < 1.0


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """evaluate.json on tiny demo data, with noise volumes standing in for generated ones."""
    tmp = tmp_path_factory.mktemp("eval")
    generated = tmp / "generated"
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        save_nifti(torch.rand(1, 32, 32, 32, generator=g), centered_affine([32] * 3, [3.0] * 3),
                   generated / f"sample_{i:04d}.nii.gz")
    control = {"lesion_count": {"n": 3, "mae": 1.0, "mae_percent_of_range": 25.0, "exact_match": 0.33}}
    (generated / "manifest.json").write_text(json.dumps({"control": control}))  # as a conditional generation's
    metadata = tmp / "metadata.json"
    shutil.copy(ROOT / "configs" / "metadata.json", metadata)
    ov = overrides_for(tmp, generate=True, generated_dir=str(generated), write_eval_metrics=True,
                       metadata_file=str(metadata), max_pairs=4)
    proc = run_bundle(EVALUATE, ov)
    return tmp, proc


def test_evaluation_writes_metrics_and_report_with_figures(evaluated):
    tmp, proc = evaluated
    folder = next((tmp / "outputs").glob("evaluation_*"))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["rows"]) == {"generated", "real (floor)", "blurred real", "noise", "real (reference)"}
    assert metrics["num_volumes"]["generated"] == 3 and metrics["num_volumes"]["real (reference)"] == 3
    # noise as "generated": far from the reference, unlike the real floor
    rows = metrics["rows"]
    assert rows["generated"]["FID (random features)"] > rows["real (floor)"]["FID (random features)"]
    assert rows["generated"]["MS-SSIM diversity"] < rows["real (reference)"]["MS-SSIM diversity"]
    assert set(metrics["known_truth"]["wasserstein"]) == set(known_truth.QUANTITIES)
    report = (folder / "report.md").read_text()
    for figure in ("samples.png", "histograms.png", "nearest.png", "known_truth.png"):
        assert f"({figure})" in report and (folder / figure).stat().st_size > 1000
    assert "FID (random features)" in report and "not comparable with published FIDs" in report
    assert metrics["control"]["lesion_count"]["exact_match"] == 0.33
    assert "## Control check (conditional generation)" in report
    assert "| lesion_count | 3 | 1.000 | 25.0 | 0.33 |" in report
    meta = json.loads((tmp / "metadata.json").read_text())
    fid = rows["generated"]["FID (random features)"]
    assert meta["eval_metrics"]["FID (random features)"] == pytest.approx(fid, rel=1e-4)
    assert "real-vs-real floor" in proc.stdout


def test_evaluation_refuses_empty_folder_and_mismatched_shapes(tmp_path, evaluated):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="holds 0 volume"):
        generated_files(str(tmp_path / "empty"), str(tmp_path))
    with pytest.raises(EvaluationError, match="no generated_\\* folder"):
        generated_files(None, str(tmp_path))
    data_tmp, _ = evaluated
    small = tmp_path / "small"
    for i in range(2):
        save_nifti(torch.rand(1, 16, 16, 16), centered_affine([16] * 3, [3.0] * 3), small / f"s{i}.nii.gz")
    ov = overrides_for(data_tmp, generate=True, generated_dir=str(small), output_dir=str(tmp_path / "out"))
    proc = run_bundle(EVALUATE, ov, check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "volume shapes differ" in line and "--volume_size" in line
