"""`--tracking mlflow` (MONAI bundle's own option) records both training stages in a local MLflow store."""

from __future__ import annotations

import pytest

from tests.helpers import COMMON, overrides_for, run_bundle

mlflow = pytest.importorskip("mlflow", reason="mlflow is an optional dependency (requirements-dev.txt)")


def test_mlflow_tracking_of_both_stages(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    track = {"tracking": "mlflow", "tracking_uri": store, "experiment_name": "ldm_test"}
    run_bundle([COMMON, "configs/train_autoencoder.json"],
               {**overrides_for(tmp_path, max_epochs=1, val_interval=1), **track})
    run_bundle([COMMON, "configs/train_diffusion.json"],
               {**overrides_for(tmp_path, stage2=True, max_epochs=1, val_interval=1, preview_steps=2,
                                preview_num_samples=1), **track})

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("ldm_test")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    stage1, stage2 = (r.data for r in runs)
    assert {"train_recon", "train_kl", "train_g_loss", "val_psnr", "val_ssim"} <= set(stage1.metrics)
    assert {"train_diffusion", "val_loss"} <= set(stage2.metrics)
    assert stage1.params["max_epochs"] == "1" and int(stage1.params["epoch_length"]) > 0
    history = client.get_metric_history(runs[0].info.run_id, "train_recon")
    assert len(history) == int(stage1.params["epoch_length"])  # one point per iteration
