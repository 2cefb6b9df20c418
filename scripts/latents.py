"""Stage-2 inputs: latents of the frozen autoencoder, cached on disk, and the latent scale factor.

The cache stores each volume's posterior mean and standard deviation (not one sampled latent, which would make
the diffusion model fit a single draw and floor its loss); every iteration samples ``mu + sigma * eps`` afresh.
For a VQ-VAE the "posterior" is the quantised embedding with ``sigma = 0`` (see :mod:`scripts.autoencoders`).
A cache file is keyed by a hash of the autoencoder weights, the preprocessing and the items, so a new autoencoder
or a new transform chain makes a new cache instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch
from torch import nn

from scripts.autoencoders import adapt
from scripts.distributed import is_main_rank, unwrap
from scripts.randomness import SAMPLE_INDEX
from scripts.storage import atomic_save, file_sha256, load_checkpoint

__all__ = [
    "PrepareLatents", "cache_key", "cache_problem", "cached_latents", "encode_items", "estimate_scale_factor",
    "posterior", "shared_fields", "stage2_dataset", "transform_fingerprint",
]

logger = logging.getLogger(__name__)


def _describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform's configuration (class and plain attributes, recursively)."""
    if depth > 6:
        return type(obj).__qualname__
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_describe(o, depth + 1) for o in obj]
    if isinstance(obj, Mapping):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        if np.size(obj) >= 64:
            return list(np.shape(obj))
        return np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj).round(6).tolist()
    if isinstance(obj, (np.random.RandomState, torch.Generator)) or callable(obj) and not hasattr(obj, "__dict__"):
        return type(obj).__qualname__
    if hasattr(obj, "__dict__"):
        fields = {k: _describe(v, depth + 1) for k, v in sorted(vars(obj).items())
                  if not k.startswith("_") and k not in ("R", "rng", "lazy_evaluation")}
        return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", **fields}
    return repr(obj)


def transform_fingerprint(transform: Any) -> str:
    """Hash of a transform chain's classes and parameters: changes when any transform or parameter changes."""
    text = json.dumps(_describe(transform), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(autoencoder_path: str, transform: Any, items: Sequence[Mapping], image_key: str = "image") -> str:
    """Key of a latent cache: autoencoder weights hash + preprocessing fingerprint + the listed files."""
    files = [str(item[image_key]) for item in items]
    text = json.dumps([file_sha256(autoencoder_path), transform_fingerprint(transform), files])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor (MetaTensor metadata dropped), so caches load with ``weights_only=True``."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def encode_items(
    autoencoder: nn.Module,
    items: Sequence[Mapping],
    transform: Callable,
    device: str | torch.device,
    image_key: str = "image",
    progress: bool = True,
    inferer: Callable | None = None,
) -> list[dict]:
    """Preprocess and encode each item; return ``{"z_mu", "z_sigma", "source"}`` dicts, tensors ``(C, *latent)`` on CPU.

    ``inferer`` (e.g. the ``SlidingWindowInferer`` over the stage-1 training patch size that reconstruction uses)
    encodes in windows: an autoencoder trained on patches normalises (GroupNorm) over a patch, so encoding the whole
    volume at once shifts its features (see :func:`posterior`)."""
    ae = unwrap(autoencoder).eval()
    encoder = adapt(ae)
    iterator = items
    if progress and is_main_rank():
        from tqdm import tqdm

        iterator = tqdm(items, desc="encoding latents", leave=False)
    out = []
    with torch.no_grad():
        for item in iterator:
            image = transform(dict(item))[image_key]
            image = _plain(image).float()[None].to(device)
            z_mu, z_sigma = posterior(encoder, image, inferer)
            out.append({"z_mu": _plain(z_mu[0]).float().cpu(), "z_sigma": _plain(z_sigma[0]).float().cpu(),
                        "source": str(item[image_key])})
    return out


def posterior(encoder: Any, image: torch.Tensor, inferer: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_mu, z_sigma)`` of ``image`` ``(B, C, *spatial)`` (image space) by an autoencoder adapter, in windows of
    ``inferer`` when given (MONAI's sliding-window inference stitches the lower-resolution latent outputs)."""
    if inferer is None:
        return encoder.posterior(image)
    z_mu, z_sigma = inferer(image, lambda x: encoder.posterior(x))
    return z_mu, z_sigma


def cached_latents(
    autoencoder: nn.Module,
    autoencoder_path: str,
    items: Sequence[Mapping],
    transform: Callable,
    cache_dir: str,
    split: str,
    device: str | torch.device,
    image_key: str = "image",
    inferer: Callable | None = None,
) -> list[dict]:
    """Latent posteriors of ``items``, read from ``cache_dir/<split>_<key>.pt`` or encoded once and written there
    (in windows of ``inferer`` when given; the key includes its settings).

    In a distributed run rank 0 encodes and writes; the other ranks wait at a barrier, then read the file.
    """
    key = cache_key(autoencoder_path, [transform, inferer] if inferer is not None else transform, items, image_key)
    path = Path(cache_dir) / f"latents_{split}_{key}.pt"
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if is_main_rank():
        problem = cache_problem(path, items, image_key) if path.is_file() else None
        if problem:
            logger.warning(f"latent cache '{path}' {problem}; rebuilding it")
            print(f"[latents] WARNING: cache '{path}' {problem}; rebuilding it", flush=True)
        if problem or not path.is_file():
            latents = encode_items(autoencoder, items, transform, device, image_key, inferer=inferer)
            atomic_save(latents, path)
            print(f"[latents] encoded {len(latents)} {split} volume(s) into {path}")
    if distributed:
        torch.distributed.barrier()
    return load_checkpoint(path, what="latent cache")


def cache_problem(path: Path, items: Sequence[Mapping], image_key: str = "image") -> str | None:
    """What is wrong with the latent cache file ``path`` of ``items`` (unreadable, another item count or order,
    entries without finite ``z_mu``/``z_sigma`` of one shape), or ``None`` when it can be used."""
    try:
        latents = load_checkpoint(path, what="latent cache")
    except ValueError as e:
        return f"cannot be read ({str(e).split('(', 1)[-1].split(')')[0]})"
    if not isinstance(latents, list) or len(latents) != len(items):
        return f"holds {len(latents) if isinstance(latents, list) else 'no list of'} items, expected {len(items)}"
    shapes = set()
    for latent, item in zip(latents, items, strict=True):
        if not isinstance(latent, Mapping) or latent.get("source") != str(item[image_key]):
            return f"does not list '{item[image_key]}' in its place"
        tensors = [latent.get("z_mu"), latent.get("z_sigma")]
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() and bool(torch.isfinite(t).all())
                   for t in tensors) or tensors[0].shape != tensors[1].shape:
            return f"holds no finite z_mu/z_sigma pair for '{item[image_key]}'"
        shapes.add(tuple(tensors[0].shape))
    if len(shapes) > 1:
        return f"holds latents of several shapes {sorted(shapes)}"
    return None


def estimate_scale_factor(latents: Sequence[Mapping], seed: int = 0, max_items: int | None = None) -> float:
    """``1 / std`` of sampled latents over the whole (cached) training set, not one batch (Rombach et al. 2022,
    sec. 4.3.2), so that diffusion sees unit-variance latents. The same on every rank: it depends only on the
    cache content and ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = latents if max_items is None else latents[:max_items]
    if not chosen:
        raise ValueError("cannot estimate the latent scale factor from an empty training set.")
    samples = [item["z_mu"] + item["z_sigma"] * torch.randn(item["z_mu"].shape, generator=generator) for item in chosen]
    std = torch.stack(samples).float().std()
    return float(1.0 / std.clamp_min(1e-8))


class PrepareLatents(PrepareBatch):
    """``prepare_batch`` for stage 2: the latent posterior ``(z_mu, z_sigma)`` of a batch, each ``(B, C, *latent)``.

    A batch of cached latents (keys ``z_mu``/``z_sigma``) is passed through; a batch of images (on-the-fly
    encoding, for random augmentation) is encoded by the frozen autoencoder.

    Args:
        autoencoder: the frozen stage-1 autoencoder; needed only for image batches.
        image_key: key of the image in image batches.
        inferer: encode image batches in its windows (as :func:`cached_latents` does).
    """

    def __init__(self, autoencoder: nn.Module | None = None, image_key: str = "image",
                 inferer: Callable | None = None) -> None:
        self.autoencoder = autoencoder
        self.image_key = image_key
        self.inferer = inferer

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if "z_mu" in batchdata:
            return (batchdata["z_mu"].to(device=device, non_blocking=non_blocking),
                    batchdata["z_sigma"].to(device=device, non_blocking=non_blocking))
        if self.autoencoder is None or self.image_key not in batchdata:
            raise KeyError(f"stage-2 batch has neither cached latents ('z_mu', 'z_sigma') nor '{self.image_key}' "
                           "with an autoencoder to encode it; check train#dataset and prepare_batch.")
        ae = unwrap(self.autoencoder).eval()
        with torch.no_grad():
            image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking).float()
            z_mu, z_sigma = posterior(adapt(ae), image, self.inferer)
        return z_mu, z_sigma


def shared_fields(items: Sequence[Mapping], image_key: str = "image") -> list[str]:
    """The datalist fields every item carries with a value, other than the image: what a batch can collate."""
    if not items:
        return []
    common = set.intersection(*({k for k, v in item.items() if v is not None} for item in items))
    return sorted(common - {image_key})


def stage2_dataset(latent_cache: bool, posteriors: Sequence[Mapping], items: Sequence[Mapping],
                   transform: Callable | None = None, cache_rate: float = 1.0, num_workers: int = 0,
                   split: str = "training", image_key: str = "image"):
    """Stage-2 data: the cached posteriors (default), or the images themselves, encoded on the fly
    by :class:`PrepareLatents`. Either way each item keeps its datalist fields (every field all items carry, e.g.
    covariates), which the objective's ``condition_name`` reads, and its position in ``items`` as ``sample_index``,
    which keys its random draws (:func:`scripts.randomness.keyed_generators`).

    Args:
        latent_cache: use the cached posteriors ``{"z_mu", "z_sigma"}`` (latent space, all held in memory: they
            are small); false: the images of ``items`` through ``transform`` (which may hold random augmentation).
        posteriors: the cached posteriors of ``items`` (:func:`cached_latents`).
        items: the datalist items (``{"image": path}``).
        transform: preprocessing of the images when ``latent_cache`` is false.
        cache_rate: fraction of the preprocessed images a ``CacheDataset`` keeps in memory when ``latent_cache``
            is false (the Model Zoo BraTS bundle's ``train#dataset#cache_rate``).
        num_workers: workers that fill that cache.
        split: the split's name, for the printed line.
        image_key: the image field (not carried beside cached latents).
    """
    from monai.data import CacheDataset, Dataset

    from scripts.distributed import print_main

    if latent_cache:
        fields = shared_fields(items, image_key)
        print_main(f"[latents] stage-2 {split} data: {len(posteriors)} cached latents"
                   + (f", with datalist fields {fields}" if fields else ""))
        return Dataset(data=[{**{k: item[k] for k in fields}, "z_mu": p["z_mu"], "z_sigma": p["z_sigma"],
                              SAMPLE_INDEX: index}
                             for index, (item, p) in enumerate(zip(items, posteriors, strict=True))])
    print_main(f"[latents] stage-2 {split} data: {len(items)} images encoded on the fly "
               f"(latent_cache false, cache_rate {cache_rate})")
    return CacheDataset(data=[{**item, SAMPLE_INDEX: index} for index, item in enumerate(items)], transform=transform,
                        cache_rate=cache_rate, num_workers=num_workers, progress=False)
