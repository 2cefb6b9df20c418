"""Loading weights into the bundle's networks with one clear message per failure, including state dicts saved by
the older ``monai-generative`` package (GenerativeModels), converted to MONAI core's key layout on load.

The configs call :func:`load_weights` for the autoencoder (``model_autoencoder.pt`` or a training checkpoint) and
the diffusion UNet (``model.pt``/``model_ema.pt``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from scripts.distributed import unwrap
from scripts.storage import load_checkpoint

__all__ = ["LEGACY_MARKERS", "WEIGHTS_SOURCES", "is_legacy_state_dict", "load_weights"]


# how to get each weight file the workflows load, for the message when it is missing
WEIGHTS_SOURCES = {
    "autoencoder": (
        "python -m monai.bundle run --config_file \"['configs/common.json','configs/train_autoencoder.json']\""
    ),
    "diffusion model": (
        "python -m monai.bundle run --config_file \"['configs/common.json','configs/train_diffusion.json']\""
    ),
}

# markers of the old monai-generative (GenerativeModels, import name `generative`) key layout
LEGACY_MARKERS = (".proj_attn.", ".to_q.", ".to_k.", ".to_v.", ".to_out.0.")


def _missing_weights_message(what: str, path: str) -> str:
    train = WEIGHTS_SOURCES.get(what)
    how = f"train them with `{train}`" if train else "train that stage"
    return (
        f"{what} checkpoint not found: '{path}'. Fetch released weights listed in large_files.yml with "
        f"`python -m monai.bundle download_large_files --bundle_path <bundle root>`, {how}, "
        "or point the config's load_*_path at your file."
    )


def is_legacy_state_dict(state: Mapping[str, Any], own: Mapping[str, Any]) -> bool:
    """Whether ``state`` is in the old ``monai-generative`` layout of the network whose state dict is ``own``.

    Old-layout keys name attention projections without MONAI core's ``.attn.`` level (``...to_q.weight``,
    ``...proj_attn.weight``) or the autoencoder's upsampling convolution ``conv`` where MONAI core has ``postconv``.
    """
    unexpected = [k for k in state if k not in own]
    return any(
        (any(m in k for m in LEGACY_MARKERS) and ".attn." not in k)
        or (".conv.conv." in k and k.replace(".conv.conv.", ".postconv.conv.") in own)
        for k in unexpected
    )


def _load_legacy(target: nn.Module, state: Mapping[str, Any], path: str, what: str) -> None:
    """Convert an old-layout state dict with MONAI's ``load_old_state_dict`` and load it, or fail with one line."""
    convert = getattr(target, "load_old_state_dict", None)
    if convert is None:
        raise ValueError(
            f"{what} checkpoint '{path}' is in the old monai-generative layout, which MONAI can convert only for "
            f"AutoencoderKL and DiffusionModelUNet, not {type(target).__name__}."
        )
    remaining = dict(state)  # MONAI pops every key it uses
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            convert(remaining)
    except (KeyError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise ValueError(
            f"{what} checkpoint '{path}' is in the old monai-generative layout but does not match the network in "
            f"the config ({type(e).__name__}: {reason}). Use the network sizes it was trained with "
            "(e.g. merge configs/brats.json for the Model Zoo BraTS bundle's weights)."
        ) from e
    # monai-generative's attention blocks defined `proj_attn` but never applied it: dropping it keeps the outputs
    left = [k for k in remaining if ".proj_attn." not in k]
    if left:
        raise ValueError(
            f"{what} checkpoint '{path}' (old monai-generative layout) holds {len(left)} weight(s) the network in the "
            f"config has no place for, e.g. '{left[0]}'. Use the network sizes it was trained with."
        )
    print(f"[weights] {what}: converted the old monai-generative layout of '{path}' to MONAI core")


def load_weights(network: nn.Module, path: str, key: str | None = None, what: str = "weights") -> nn.Module:
    """Load a state dict from ``path`` into ``network`` (strict), failing with one clear message.

    Accepts plain state dicts (the Model Zoo's ``model_autoencoder.pt``/``model.pt``), training checkpoints
    holding the state dict under ``key``, and state dicts saved by the older ``monai-generative`` package
    (GenerativeModels), converted with MONAI's ``load_old_state_dict``.

    Args:
        network: the module to load into (a DDP wrapper is unwrapped).
        path: checkpoint file.
        key: key of the state dict inside a training checkpoint; tried only when present.
        what: words naming the weights in messages, e.g. ``"autoencoder"``.

    Raises:
        FileNotFoundError: the file is missing; the message says how to fetch or train it.
        ValueError: the file holds weights of another architecture or size.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(_missing_weights_message(what, path))
    state = load_checkpoint(path, what=f"{what} checkpoint")
    if isinstance(state, Mapping) and key is not None and key in state and isinstance(state[key], Mapping):
        state = state[key]
    target = unwrap(network)
    own = target.state_dict()
    if is_legacy_state_dict(state, own):
        _load_legacy(target, state, path, what)
        return network
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        detail = []
        if mismatched:
            k = mismatched[0]
            detail.append(f"shape of '{k}' is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the config")
        if missing:
            detail.append(f"{len(missing)} missing key(s), e.g. '{missing[0]}'")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected key(s), e.g. '{unexpected[0]}'")
        raise ValueError(
            f"{what} checkpoint '{path}' does not match the network in the config ({'; '.join(detail)}). "
            "Use the config the checkpoint was trained with, or re-train."
        )
    target.load_state_dict(state)
    return network
