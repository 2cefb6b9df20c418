"""Datalists, the two transforms we add to MONAI's, and batch preparation.

The preprocessing chain itself is wired in ``configs/common.json`` from MONAI transforms; this module holds
the logic the config calls: finding the datalist (the embedded demo data when the user names none), checking
that every file it lists exists and can be read before any training starts, and turning a batch into the
image tensor the engines train on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai import transforms as mt
from monai.config import KeysCollection
from monai.data import load_decathlon_datalist
from monai.engines.utils import PrepareBatch
from monai.transforms import MapTransform
from monai.utils import CommonKeys

__all__ = [
    "PrepareImage", "RequireFinited", "SelectChanneld", "Spacingd", "check_readable", "load_datalist",
    "resolve_datalist",
]

DATALIST_NAMES = ("datalist.json", "dataset.json")


def resolve_datalist(
    dataset_dir: str, datalist: str | None = None, demo_dir: str | None = None, demo: Mapping | None = None
) -> str:
    """Find the datalist JSON to use, generating the embedded demo data when the user names no data.

    Args:
        dataset_dir: folder the datalist's relative paths are relative to.
        datalist: explicit datalist path; ``None`` looks for ``datalist.json`` then ``dataset.json``
            (the Medical Segmentation Decathlon's name) inside ``dataset_dir``.
        demo_dir: the demo-data folder. When ``dataset_dir`` is this folder and no datalist is given, the demo
            data is generated there (or reused if already there with the same settings).
        demo: keyword arguments of :func:`scripts.demo_data.ensure_demo_data` (count, size, spacing, seed).

    Raises:
        FileNotFoundError: the datalist named, or any datalist in ``dataset_dir``, does not exist.
    """
    if datalist:
        if not os.path.isfile(datalist):
            raise FileNotFoundError(
                f"datalist '{datalist}' not found. Fix the 'datalist' config value, or leave it null to use "
                f"'<dataset_dir>/datalist.json'."
            )
        return str(datalist)
    if demo_dir is not None and os.path.abspath(dataset_dir) == os.path.abspath(demo_dir):
        from scripts.demo_data import ensure_demo_data

        return ensure_demo_data(dataset_dir, **dict(demo or {}))
    for name in DATALIST_NAMES:
        candidate = os.path.join(dataset_dir, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"no datalist found in dataset_dir '{dataset_dir}' (looked for {', '.join(DATALIST_NAMES)}). "
        "Pass --datalist <file.json> (Decathlon format), or fix --dataset_dir."
    )


def load_datalist(
    datalist: str,
    split: str,
    base_dir: str | None = None,
    keys: Sequence[str] = ("image",),
    check_files: bool = True,
    allow_empty: bool = False,
    keep_records: bool = False,
) -> list[dict]:
    """Load one split of a Decathlon-style datalist, with every listed file checked to exist.

    Args:
        datalist: datalist JSON path.
        split: ``"training"``, ``"validation"`` or ``"test"`` (any key of the JSON).
        base_dir: folder relative paths start from; default: the datalist's folder.
        keys: item keys that hold file paths to check.
        check_files: check existence and readability of every file under ``keys``.
        allow_empty: return an empty list for a missing or empty split instead of raising.
        keep_records: keep nested per-subject records (e.g. the demo's ``params``), which batches cannot collate;
            evaluation reads them.

    Raises:
        KeyError: the split is missing or empty (unless ``allow_empty``).
        FileNotFoundError: a listed file does not exist.
        ValueError: a listed file cannot be read as an image.
    """
    with open(datalist) as f:
        content = json.load(f)
    if not content.get(split):
        if allow_empty:
            return []
        raise KeyError(
            f"datalist '{datalist}' has no '{split}' entries "
            f"(it has: {sorted(k for k, v in content.items() if isinstance(v, list))}). "
            f"Add a '{split}' list, or choose another split in the config."
        )
    items = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=split, base_dir=base_dir)
    # nested per-subject records (e.g. the demo data's generating parameters) cannot be collated into batches;
    # they stay in the JSON for evaluation
    if not keep_records:
        items = [{k: v for k, v in item.items() if not isinstance(v, (dict, list))} for item in items]
    if check_files:
        check_items(items, keys, f"datalist '{datalist}' split '{split}'")
    return items


def check_items(items: Sequence[Mapping], keys: Sequence[str], source: str) -> None:
    """Check that every file named under ``keys`` in ``items`` exists and can be read as an image.

    Raises:
        FileNotFoundError: naming the first missing file, how many more are missing and where they are listed.
        ValueError: naming the first unreadable file.
    """
    missing = [str(item[k]) for item in items for k in keys if k in item and not os.path.exists(item[k])]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"{source} names a missing file: '{missing[0]}'{more}. "
            "Fix the paths in the datalist or the 'dataset_dir' they are relative to."
        )
    for item in items:
        for k in keys:
            if k in item:
                check_readable(item[k])


def decathlon_items(root_dir: str, task: str, section: str, val_frac: float = 0.2, seed: int = 0) -> list[dict]:
    """One section of a Medical Segmentation Decathlon task (``root_dir/<task>/dataset.json``), split as
    ``monai.apps.DecathlonDataset`` splits it (``download=False``: nothing is fetched).

    Args:
        root_dir: folder holding the task folder, e.g. the folder containing ``Task01_BrainTumour``.
        task: task folder name.
        section: ``"training"``, ``"validation"`` (``val_frac`` of the training cases) or ``"test"``.
        val_frac: fraction of the labelled cases held out for validation.
        seed: seed of the train/validation split.

    Raises:
        FileNotFoundError: the task folder or one of its listed files is missing.
    """
    from monai.apps import DecathlonDataset

    dataset_json = os.path.join(root_dir, task, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise FileNotFoundError(
            f"Decathlon task not found: '{dataset_json}' does not exist. Set --dataset_dir to the folder that "
            f"contains '{task}/' (downloads are disabled)."
        )
    dataset = DecathlonDataset(root_dir=root_dir, task=task, section=section, transform=(), download=False,
                               val_frac=val_frac, seed=seed, cache_rate=0.0)
    items = [{k: v for k, v in item.items() if isinstance(v, str)} for item in dataset.data]
    check_items(items, ("image",), f"Decathlon {task} '{section}' section")
    return items


def check_readable(path: str | os.PathLike) -> None:
    """Raise one clear ``ValueError`` if ``path`` cannot be an image the workflows read, without decoding it.

    Checked up front, for every listed file: a directory that is no DICOM series, a NIfTI header that cannot be
    read, a NIfTI image that is 2D or has more than 4 dimensions, and a NIfTI file shorter than its header implies
    (a plain ``.nii`` by its size; a ``.nii.gz`` by the uncompressed size in its gzip trailer, decompressed in full
    only when that size disagrees). Other formats are read with MONAI's ``LoadImage``. NaN or infinite voxels are
    found when the image is loaded (:class:`RequireFinited`), which for training happens while the data is cached,
    before the first iteration.
    """
    path = str(path)
    if os.path.isdir(path):
        if not any(name.lower().endswith(".dcm") for name in os.listdir(path)):
            raise ValueError(f"datalist entry '{path}' is a directory, not an image file. List the image file "
                             "itself (a DICOM series folder must hold .dcm files), or remove it from the datalist.")
        return
    nifti = path.endswith((".nii", ".nii.gz"))
    try:
        if nifti:
            import nibabel as nib

            img = nib.load(path)
            shape, needed = tuple(img.shape), _nifti_bytes(img)
        else:
            from monai.transforms import LoadImage

            shape, needed = tuple(LoadImage(image_only=True)(path).shape), None
    except Exception as e:
        raise ValueError(
            f"cannot read image '{path}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Replace or remove it from the datalist."
        ) from e
    if len(shape) < 3 or (nifti and 1 in shape[:3]):
        raise ValueError(f"image '{path}' is 2D (shape {shape}); the workflows take 3D volumes (X, Y, Z). Convert "
                         "it to a 3D volume or remove it from the datalist.")
    if nifti and len(shape) > 4:
        raise ValueError(f"image '{path}' is {len(shape)}D (shape {shape}); the workflows take 3D volumes, with "
                         "channels last (X, Y, Z, C) at most. Keep one volume (e.g. one time point) per file or "
                         "remove it from the datalist.")
    if needed is not None:
        held = _nifti_held_bytes(path, needed)
        if held < needed:
            raise ValueError(f"image '{path}' is truncated: its header implies {needed} bytes, the file holds "
                             f"{held}. Copy it again from its source or remove it from the datalist.")


def _nifti_bytes(img: Any) -> int:
    """Bytes an uncompressed NIfTI file with ``img``'s header holds: the data offset plus the voxel data."""
    header = img.header
    count = 1
    for n in img.shape:
        count *= int(n)
    offset = getattr(img.dataobj, "offset", None)  # where the data starts on disk (the loaded header says 0)
    return int(header.get_data_offset() if offset is None else offset) + count * header.get_data_dtype().itemsize


def _nifti_held_bytes(path: str, needed: int) -> int:
    """Uncompressed bytes the file holds, read cheaply: the file size of a ``.nii``; for a ``.nii.gz`` the gzip
    trailer's size (modulo 2^32), or, when that disagrees with ``needed``, the bytes a streaming decompression of
    every gzip member yields before the data ends or breaks."""
    if not path.endswith(".gz"):
        return os.path.getsize(path)
    import zlib

    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        trailer = int.from_bytes(f.read(4), "little")
        if trailer == needed % 2**32:
            return needed
        f.seek(0)
        held, stream = 0, zlib.decompressobj(16 + zlib.MAX_WBITS)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            while chunk:
                try:
                    held += len(stream.decompress(chunk))
                except zlib.error:
                    return held  # corrupt from here on: what was decoded is what the file holds
                chunk = stream.unused_data if stream.eof else b""
                if stream.eof:  # a further gzip member follows
                    stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return held


class RequireFinited(MapTransform):
    """Fail with one line naming the file when a loaded image holds NaN or infinite voxels (which would turn every
    loss to NaN); put it right after ``LoadImaged``.

    Args:
        keys: keys of the images to check.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            finite = torch.isfinite(torch.as_tensor(d[key]))
            if not bool(finite.all()):
                source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"image '{source}' holds {int((~finite).sum())} NaN or infinite voxels. Fix or "
                                 "replace the file, or remove it from the datalist.")
        return d


class SelectChanneld(MapTransform):
    """Keep one channel of a channel-first image (e.g. FLAIR, channel 0, of the Decathlon BraTS volumes).

    Args:
        keys: keys of the images to select from.
        channel: index of the channel to keep; ``None`` keeps all channels.
    """

    def __init__(self, keys: KeysCollection, channel: int | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channel = channel

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.channel is None:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            if not 0 <= self.channel < img.shape[0]:
                raise ValueError(f"'{key}' has {img.shape[0]} channel(s); cannot select channel {self.channel}.")
            d[key] = img[self.channel : self.channel + 1]
        return d


class Spacingd(mt.Spacingd):
    """MONAI's ``Spacingd`` (same arguments, same inverse for ``Invertd``) that leaves the item's other entries alone.

    MONAI 1.6's ``Spacingd`` calls ``.update()`` on every ``<key>_*`` entry of a NIfTI item, taking each for a
    metadata dictionary, so an item with a string such as MONAI Label's ``image_path`` fails with ``'str' object has
    no attribute 'update'``. Here entries ``<key>_*`` that are not dictionaries are set aside during the resampling
    and put back unchanged.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        keys = set(self.keys)
        aside = {k: d.pop(k) for k in list(d) if isinstance(k, str) and k not in keys and not isinstance(d[k], Mapping)
                 and any(k.startswith(f"{key}_") for key in keys)}
        out = super().__call__(d, lazy=lazy)
        out.update(aside)
        return out


class PrepareImage(PrepareBatch):
    """``prepare_batch`` for the engines: take the image to model from a batch dictionary.

    Returns ``(image, image)``: the autoencoder reconstructs its input, and MONAI's evaluators expect an
    (input, target) pair. To train on a dataset whose batches hold the image under another key, set the config's
    ``prepare_batch`` to ``{"_target_": "scripts.data.PrepareImage", "key": "t1"}``, or to any callable with
    the signature ``(batchdata, device, non_blocking, **kwargs) -> tensor | (tensor, tensor)``.

    Args:
        key: batch key of the image tensor, shape ``(B, C, *spatial)``.
    """

    def __init__(self, key: str = CommonKeys.IMAGE) -> None:
        self.key = key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key not in batchdata:
            raise KeyError(
                f"batch has no '{self.key}' key (keys: {sorted(map(str, batchdata))}); "
                "set the config's 'prepare_batch' to read the right key."
            )
        image = batchdata[self.key].to(device=device, non_blocking=non_blocking, **kwargs)
        return image, image


def image_from_batch(batch: Any) -> torch.Tensor:
    """The image tensor of what a ``prepare_batch`` callable returned (a tensor or an (input, target) tuple)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def inference_items(
    files: Sequence[str] | None,
    split: str,
    dataset_dir: str,
    datalist: str | None = None,
    demo_dir: str | None = None,
    demo: Mapping | None = None,
    keep_records: bool = False,
) -> list[dict]:
    """The volumes an inference workflow processes: ``files`` when given, else one split of the datalist
    (with its per-subject records when ``keep_records``).

    Args:
        files: image paths (any format MONAI's ``LoadImage`` reads); ``None`` or empty uses the datalist.
        split: datalist split to use when no files are given.
        dataset_dir, datalist, demo_dir, demo: as for :func:`resolve_datalist`.

    Raises:
        FileNotFoundError: a given file does not exist.
    """
    if files:
        items = [{"image": os.path.abspath(str(f))} for f in files]
        for item in items:
            if not os.path.exists(item["image"]):
                raise FileNotFoundError(f"input file '{item['image']}' not found. Fix the 'files' list.")
            check_readable(item["image"])
        return items
    return load_datalist(resolve_datalist(dataset_dir, datalist, demo_dir, demo), split, base_dir=dataset_dir,
                         keep_records=keep_records)
