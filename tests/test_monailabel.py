"""MONAI Label serves the bundle: a real server (MONAI Label 0.8.5, from its own environment) on 127.0.0.1, the demo
volumes posted to /infer, the answers compared with what `monai.bundle run` writes for the same volume and seed.

The server runs from the environment of ``apps/monailabel/install.sh`` (``<bundle>/.venv-monailabel``, or the
interpreter named by ``MONAILABEL_PYTHON``); the test skips where none is installed (CI installs only
requirements-dev.txt: the recipe takes minutes, see apps/monailabel/README.md). ``MONAILABEL_EVIDENCE=<folder>``
keeps the server log and the HTTP answers there.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from tests.helpers import COMMON, ROOT, TINY, TINY_DIFFUSION, run_bundle

APP = ROOT / "apps" / "monailabel"
#: tiny networks on 32^3 volumes, float32
OVERRIDES = {**{k: v for k, v in TINY.items() if k not in ("train_patch_size", "num_workers")}, **TINY_DIFFUSION,
             "amp": False}
#: and for generation: a DDPM-trained schedule, so that a request can choose DDIM; two sampling steps
GENERATION = {"noise_scheduler_type": "ddpm", "num_inference_steps": 2, "scale_factor": 1.0}
STARTUP_S, REQUEST_S = 240, 180


def _server_python() -> Path:
    python = Path(os.environ.get("MONAILABEL_PYTHON") or ROOT / ".venv-monailabel" / "bin" / "python")
    if not python.is_file():
        pytest.skip(f"no MONAI Label environment at {python}: install it with `bash apps/monailabel/install.sh` "
                    "(or name its python in MONAILABEL_PYTHON)")
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _volume(path: Path, shape, affine) -> None:
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    volume = np.exp(-2 * sum(g ** 2 for g in grid)) + 0.1 * np.random.default_rng(0).random(shape)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(path))


def _post(url: str, image: Path, params: dict) -> tuple[dict, bytes]:
    """POST ``image`` and ``params`` as MONAI Label's /infer form; (answer JSON, answer NIfTI bytes)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{json.dumps(params)}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{image.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + image.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=REQUEST_S) as response:
        content_type, payload = response.headers["Content-Type"], response.read()
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + payload)
    parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
             for part in message.get_payload()}
    return json.loads(parts["params"]), parts["image"]


def _read(data: bytes, path: Path) -> nib.Nifti1Image:
    path.write_bytes(data)
    return nib.load(str(path))


@pytest.fixture
def server(tmp_path):
    """A MONAI Label server of this bundle's app on 127.0.0.1, from an unrelated working folder, stopped by its
    PID; yields (base URL, bundle_root with tiny untrained weights, studies folder)."""
    python = _server_python()
    parser = ConfigParser(ConfigParser.load_config_files([str(ROOT / COMMON)]))
    parser.update({**OVERRIDES, **GENERATION})
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("autoencoder_def").state_dict(), tmp_path / "models" / "model_autoencoder.pt")
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "models" / "model_ema.pt")
    app = tmp_path / "app"  # a copy: start_server creates model/, lib/, logs/ and bin/ in the app folder
    app.mkdir()
    for name in ("main.py", "bundle_tasks.py"):
        shutil.copy(APP / name, app / name)
    studies, cwd = tmp_path / "studies", tmp_path / "elsewhere"
    studies.mkdir()
    cwd.mkdir()
    _volume(studies / "demo.nii.gz", (32, 32, 32), np.diag([3.0, 3.0, 3.0, 1.0]))  # on the model's grid
    crop_affine = np.diag([2.5, 3.0, 3.5, 1.0])
    crop_affine[:3, 3] = [10.0, -20.0, 5.0]
    _volume(studies / "crop.nii.gz", (56, 64, 48), crop_affine)
    port = _free_port()
    log = tmp_path / "server.log"
    overrides = {**OVERRIDES, "bundle_root": str(tmp_path)}
    cmd = [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port), "--conf", "models", "reconstruction,generation",
           "--conf", "bundle", str(ROOT), "--conf", "overrides", json.dumps(overrides),
           "--conf", "generation_overrides", json.dumps(GENERATION)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MONAI_LABEL_TASKS_TRAIN"] = "false"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"MONAI Label exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/info/", timeout=5) as response:
                    (tmp_path / "info.json").write_bytes(response.read())
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"MONAI Label did not answer within {STARTUP_S} s:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        yield base, tmp_path, studies
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        keep = os.environ.get("MONAILABEL_EVIDENCE")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for name in ("server.log", "info.json", "responses.json", "differences.json"):
                if (tmp_path / name).is_file():
                    shutil.copy(tmp_path / name, Path(keep) / name)


def test_monailabel_serves_the_bundles_reconstruction_and_generation(server):
    base, root, studies = server
    info = json.loads((root / "info.json").read_text())
    assert set(info["models"]) == {"reconstruction", "generation"}
    assert info["models"]["generation"]["config"]["seed"] == 0
    responses, differences = {}, {}
    demo = studies / "demo.nii.gz"
    outputs = root / "bundle_outputs"

    # reconstruction: the bundle's own `monai.bundle run` of the same volume, and the served answer
    run_bundle([COMMON, "configs/inference_autoencoder.json"],
               {**OVERRIDES, "bundle_root": str(root), "output_dir": str(outputs), "files": [str(demo)],
                "num_workers": 0})
    (written,) = outputs.glob("reconstruction_*/demo_reconstruction.nii.gz")
    responses["reconstruction"], data = _post(f"{base}/infer/reconstruction", demo, {})
    served = _read(data, root / "served_reconstruction.nii.gz")
    differences["reconstruction"] = float(np.abs(served.get_fdata() - nib.load(str(written)).get_fdata()).max())
    assert served.shape == (32, 32, 32)
    np.testing.assert_allclose(served.affine, nib.load(str(demo)).affine, atol=1e-5)

    # a 56x64x48 crop comes back on its own grid
    crop = studies / "crop.nii.gz"
    responses["reconstruction_crop"], data = _post(f"{base}/infer/reconstruction", crop, {})
    served_crop = _read(data, root / "served_crop.nii.gz")
    assert served_crop.shape == (56, 64, 48)
    np.testing.assert_allclose(served_crop.affine, nib.load(str(crop)).affine, atol=1e-5)

    # generation: seed and sampler as request parameters; the bundle's sample_0000 for the same seed and sampler
    run_bundle([COMMON, "configs/inference.json"],
               {**OVERRIDES, **GENERATION, "bundle_root": str(root), "output_dir": str(outputs), "num_samples": 1,
                "seed": 3, "sampler": "ddim"})
    (sample,) = outputs.glob("generated_*/sample_0000.nii.gz")
    responses["generation"], data = _post(f"{base}/infer/generation", demo, {"seed": 3, "sampler": "ddim"})
    generated = _read(data, root / "served_generation.nii.gz")
    differences["generation"] = float(np.abs(generated.get_fdata() - nib.load(str(sample)).get_fdata()).max())
    np.testing.assert_allclose(generated.affine, nib.load(str(demo)).affine, atol=1e-5)
    assert responses["generation"]["seed"] == 3 and responses["generation"]["sampler_name"] == "ddim"
    _, other = _post(f"{base}/infer/generation", demo, {"seed": 4, "sampler": "ddim"})
    assert np.abs(_read(other, root / "other.nii.gz").get_fdata() - generated.get_fdata()).max() > 1e-3

    (root / "responses.json").write_text(json.dumps(responses, indent=2))
    (root / "differences.json").write_text(json.dumps({"max_abs_difference": differences}, indent=2))
    assert differences["reconstruction"] < 1e-4 and differences["generation"] < 1e-4, differences
