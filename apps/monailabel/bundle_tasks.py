"""MONAI Label infer tasks that run the bundle's own inference workflows (built by ``scripts.serving``).

Each request runs MONAI Label's ``BasicInferTask`` steps with the workflow's pieces, by their MONAI property ids:
``preprocessing`` (the shared chain of ``configs/common.json``), the network or the sampling pipeline, then
``postprocessing`` (``Invertd``), so the answer is on the grid of the image that came in, with its affine; it is
written as a float32 NIfTI file.

Imports only ``monailabel.tasks.infer.basic_infer`` of MONAI Label: its ``BundleInferTask`` (the stock
``monaibundle`` app) imports ``monailabel.transform.post``, which needs torchvision and shapely, and this app needs
neither.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import Inferer
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from scripts.generation import sample_like
from scripts.nifti import save_nifti
from scripts.serving import served_config

logger = logging.getLogger(__name__)

__all__ = ["GenerationTask", "ReconstructionTask"]


class _WorkflowTask(BasicInferTask):
    """A served workflow: its preprocessing, postprocessing and a float32 NIfTI writer.

    Args:
        parser: the workflow's config (:func:`scripts.serving.served_config`), weights loaded.
        description: shown by MONAI Label's ``/info`` and 3D Slicer.
        config: request parameters and their defaults (MONAI Label's task ``config``).
    """

    task = "workflow"

    def __init__(self, parser: ConfigParser, description: str, config: Mapping[str, Any] | None = None) -> None:
        self.parser = parser
        self.device = parser.get_parsed_content("device")
        super().__init__(path=None, network=None, type=InferType.OTHERS, labels=None, dimension=3,
                         description=description, config=dict(config or {}), load_strict=True)

    def is_valid(self) -> bool:
        return True  # the weights were loaded (strictly) when the workflow was built

    def pre_transforms(self, data: Any = None) -> Sequence[Callable]:
        return list(self.parser.get_parsed_content("preprocessing").transforms)

    def inverse_transforms(self, data: Any = None) -> None:
        return None  # postprocessing inverts the preprocessing itself (Invertd)

    def post_transforms(self, data: Any = None) -> Sequence[Callable]:
        return list(self.parser.get_parsed_content("postprocessing").transforms)

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        with torch.no_grad():
            data[self.output_label_key] = self.answer(data, data[self.input_key].to(self.device)).cpu()
        return data

    def answer(self, data: Mapping[str, Any], image: torch.Tensor) -> torch.Tensor:
        """The answer ``(C, *spatial)`` on the preprocessed grid, for the preprocessed ``image`` ``(C, *spatial)``."""
        raise NotImplementedError

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        pred = data[self.output_label_key]
        with tempfile.NamedTemporaryFile(prefix=f"{self.task}_", suffix=".nii.gz", delete=False) as f:
            path = Path(f.name)  # MONAI Label removes it once sent, as its own writer's files
        save_nifti(pred.as_tensor() if hasattr(pred, "as_tensor") else pred, np.asarray(pred.affine), path)
        return str(path), {"task": self.task, "shape": list(pred.shape[1:]), **self.facts(data)}

    def facts(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """What the answer JSON reports besides the task and shape."""
        return {}


class ReconstructionTask(_WorkflowTask):
    """Image in, its deterministic reconstruction out (``configs/inference_autoencoder.json``).

    Args:
        overrides: config overrides of the workflow (e.g. ``bundle_root``, network sizes).
    """

    task = "reconstruction"

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        parser = served_config("reconstruction", overrides)
        super().__init__(parser, "Reconstruction by the stage-1 autoencoder (posterior mean), on the input's grid")
        self.network = parser.get_parsed_content("network")
        self.bundle_inferer: Inferer = parser.get_parsed_content("inferer")

    def answer(self, data: Mapping[str, Any], image: torch.Tensor) -> torch.Tensor:
        return self.bundle_inferer(image[None], self.network)[0]


class GenerationTask(_WorkflowTask):
    """A reference image in (it gives only the output grid), a generated volume out (``configs/inference.json``):
    sample 0 of the request's ``seed``, drawn with its ``sampler`` (``num_inference_steps``: 0 is the sampler's
    default), the volume ``monai.bundle run`` writes as ``sample_0000.nii.gz`` with the same settings.

    Args:
        overrides: config overrides of the workflow.
    """

    task = "generation"

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self.overrides = dict(overrides or {})
        parser = served_config("generation", self.overrides)
        self.default_sampler = parser.get_parsed_content("sampler")
        self._pipelines: dict[tuple[str, int], tuple[Any, Any]] = {}
        super().__init__(parser, "Generation by the latent diffusion model, on the reference image's grid",
                         config={"seed": 0, "sampler": self.default_sampler, "num_inference_steps": 0})

    def _pipeline(self, sampler: str, steps: int) -> tuple[Any, Any]:
        """(pipeline, latent shape) of a sampler and step count, built once each."""
        key = (sampler, steps)
        if key not in self._pipelines:
            overrides = {**self.overrides, "sampler": sampler, **({"num_inference_steps": steps} if steps else {})}
            try:
                parser = served_config("generation", overrides) if overrides != self.overrides else self.parser
            except (KeyError, ValueError) as e:  # e.g. a sampler the model cannot use: one line, for the client
                raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e).strip("'\"")) from None
            self._pipelines[key] = (parser.get_parsed_content("pipeline"), parser.get_parsed_content("latent_shape"))
        return self._pipelines[key]

    def _request(self, data: Mapping[str, Any]) -> tuple[str, int, int]:
        """(sampler, steps, seed) of a request; the task's defaults where it names none."""
        return (str(data.get("sampler") or self.default_sampler), int(data.get("num_inference_steps") or 0),
                int(data.get("seed") or 0))

    def answer(self, data: Mapping[str, Any], image: torch.Tensor) -> torch.Tensor:
        sampler, steps, seed = self._request(data)
        pipeline, latent_shape = self._pipeline(sampler, steps)
        return sample_like(pipeline, latent_shape, image, seed=seed, device=self.device)

    def facts(self, data: Mapping[str, Any]) -> dict[str, Any]:
        sampler, steps, seed = self._request(data)
        return {**self._pipeline(sampler, steps)[0].describe(), "sampler_name": sampler, "seed": seed}
