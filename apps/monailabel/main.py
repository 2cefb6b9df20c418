"""MONAI Label app serving this bundle's inference: ``reconstruction`` (image in, reconstruction out) and
``generation`` (a reference image gives the output grid; seed and sampler are request parameters; a sample out).

Start it from any folder (see README.md beside this file)::

    <venv>/bin/python -m monailabel.main start_server --app <bundle>/apps/monailabel --studies <images folder> \\
        --conf models reconstruction,generation --conf overrides '{"bundle_root": "/path/with/models"}'

``--conf`` keys: ``models`` (the tasks to serve, comma-separated; default both), ``overrides`` (a JSON object of
config overrides for every task, as ``monai.bundle run`` takes them: ``bundle_root`` for where ``models/`` is,
network sizes...), ``<task>_overrides`` (more, for one task: e.g. ``generation_overrides '{"use_ema": false}'``;
a key the task's configs do not define is refused), ``bundle`` (the bundle whose ``configs/`` and ``scripts/`` to
serve; default: the one holding this app). Synthesis from a label map awaits the ControlNet workflow (issue 14)
and is not served yet.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

APP_DIR = Path(__file__).resolve().parent
#: the bundle this app is part of (``--conf bundle`` serves another copy)
BUNDLE_ROOT = APP_DIR.parents[1]
#: the tasks served (classes of bundle_tasks.py)
TASKS = ("reconstruction", "generation")

logger = logging.getLogger(__name__)


def _json_object(conf: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(conf.get(key) or "{}")
    except json.JSONDecodeError as e:
        value = e
    if not isinstance(value, dict):
        raise ValueError(f"--conf {key} must be a JSON object of config ids and values, such as "
                         "'{\"bundle_root\": \"/path/with/models\"}'.")
    return value


def parse_conf(conf: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The tasks to serve and each one's config overrides, from the ``--conf`` values.

    Raises:
        ValueError: an unknown task name, or overrides that are not a JSON object; one line naming the fix.
    """
    names = [n.strip() for n in str(conf.get("models", ",".join(TASKS))).split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"--conf models {','.join(names)}: unknown task(s) {unknown}; serve some of {list(TASKS)} "
                         "(synthesis from a label map awaits the ControlNet workflow, issue 14).")
    shared = _json_object(conf, "overrides")
    return {name: {**shared, **_json_object(conf, f"{name}_overrides")} for name in names}


class LatentDiffusionApp(MONAILabelApp):
    """The bundle's inference workflows as MONAI Label infer tasks (no training, no active learning)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = conf or {}
        self.tasks = parse_conf(conf)
        self.bundle = Path(conf.get("bundle") or BUNDLE_ROOT).resolve()
        if not (self.bundle / "scripts" / "serving.py").is_file():
            raise ValueError(f"--conf bundle {self.bundle}: not this bundle (no scripts/serving.py); point it at the "
                             "folder holding configs/ and scripts/.")
        # the bundle's `scripts` package, and bundle_tasks.py beside this file, for the tasks' import below
        for folder in (str(self.bundle), str(APP_DIR)):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="latent_diffusion_3d",
                         description="3D latent diffusion bundle: reconstruction and generation", version="1")

    def init_infers(self) -> dict[str, InferTask]:
        import bundle_tasks  # needs the bundle on sys.path, which __init__ has put there

        classes = {"reconstruction": bundle_tasks.ReconstructionTask, "generation": bundle_tasks.GenerationTask}
        infers = {}
        for name, overrides in self.tasks.items():
            logger.info(f"building task '{name}' from {self.bundle} with overrides {overrides}")
            infers[name] = classes[name](overrides)
        return infers

    def init_trainers(self) -> dict:
        return {}
