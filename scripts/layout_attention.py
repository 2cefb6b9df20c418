"""LayoutDiffuse's layout attention (Cheng et al. 2023, https://arxiv.org/abs/2302.08908) lifted to 3D, on the frozen
stage-2 UNet: generation from class-named 3D boxes alone.

A layout is a pair ``(instances, classes)``: ``instances`` ``(B, 1, *spatial)`` integer, image resolution (box ``k``
has id ``k``, 0 outside every box; :func:`scripts.layout.rasterise`), and ``classes`` ``(B, K)`` integer, the
vocabulary index + 1 of box ``k`` in column ``k - 1`` (0: no box). An empty layout (all zeros) is the unconditional
branch of classifier-free guidance.

At each chosen UNet level, a :class:`LayoutAttentionBlock` runs on the features entering the decoder stage of that
level (a forward pre-hook on MONAI's ``DiffusionModelUNet.up_blocks``; the UNet's code and weights are untouched).
Each box is pooled (max) onto the level's latent grid; a token belongs to the last box covering it, or to the
background. Self-attention is restricted to tokens of the same region (features normalised per token), the class
embedding of the token's box (a learned null embedding for the background) is added to the normalised features
before the query, key and value projections, and the output projection starts at zero, so the wrapped UNet starts
as the base model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from torch import nn

from scripts.controlnet import ControlNetTrainingInferer, batch_label_map, label_vocabulary
from scripts.diffusion import LatentDiffusionPrepareBatch

__all__ = ["LayoutAttention", "LayoutAttentionBlock", "LayoutPrepareBatch", "LayoutTrainingInferer",
           "check_layout_record", "component_layout", "empty_layout", "encode_layout", "layout_denoiser",
           "token_regions"]

Layout = tuple[torch.Tensor, torch.Tensor]


def encode_layout(instances: np.ndarray, names: Mapping[int, str], vocabulary: Sequence[str],
                  source: str = "layout") -> Layout:
    """One rasterised layout as tensors: ``(1, 1, *spatial)`` instances and ``(1, K)`` class indices (+1).

    Raises:
        ValueError: a box names a class outside ``vocabulary``, naming it.
    """
    vocab = list(vocabulary)
    unknown = sorted({n for n in names.values() if n not in vocab})
    if unknown:
        raise ValueError(f"layout {source} names classes {unknown} that the layout blocks were not trained on; use "
                         f"one of {vocab} (or train configs/train_layout.json with them in layout_classes).")
    k = max(names) if names else 0
    classes = torch.zeros(1, max(k, 1), dtype=torch.long)
    for box_id, name in names.items():
        classes[0, box_id - 1] = vocab.index(name) + 1
    return torch.as_tensor(np.asarray(instances), dtype=torch.long)[None, None], classes


def empty_layout(layout: Layout) -> Layout:
    """The unconditional layout of the same batch and grid: no box anywhere."""
    return torch.zeros_like(layout[0]), torch.zeros_like(layout[1])


def component_layout(label: torch.Tensor, class_values: Sequence[int]) -> Layout:
    """Training layouts from label maps: each connected component of each class in ``class_values`` becomes a box
    (its bounding box), class index ``j + 1`` for ``class_values[j]``.

    Args:
        label: ``(B, 1, *spatial)`` label maps, image resolution.
        class_values: the label values of the layout vocabulary, in vocabulary order.
    """
    from scipy import ndimage

    maps = label.detach().round().long().cpu().numpy()[:, 0]
    instances = np.zeros(maps.shape, dtype=np.int64)
    per_item: list[list[int]] = []
    for b, lab in enumerate(maps):
        classes: list[int] = []
        for j, value in enumerate(class_values):
            components, count = ndimage.label(lab == int(value))
            for box in ndimage.find_objects(components)[:count]:
                classes.append(j + 1)
                instances[b][box] = len(classes)
        per_item.append(classes)
    width = max([len(c) for c in per_item] + [1])
    table = torch.zeros(len(per_item), width, dtype=torch.long)
    for b, classes in enumerate(per_item):
        table[b, : len(classes)] = torch.tensor(classes, dtype=torch.long)
    return torch.as_tensor(instances)[:, None].to(label.device), table.to(label.device)


def token_regions(layout: Layout, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(regions, token_classes)``, both ``(B, N)`` over the ``N = prod(grid)`` tokens of a latent grid: the box a
    token belongs to (the last box whose max-pooled mask covers it; 0: background) and that box's class index + 1
    (0: background, the null embedding)."""
    instances, classes = layout
    k = classes.shape[1]
    ids = torch.arange(1, k + 1, device=instances.device).view(1, k, *([1] * (instances.ndim - 2)))
    masks = (instances == ids).float()  # (B, K, *spatial)
    pooled = nn.functional.adaptive_max_pool3d(masks, tuple(int(g) for g in grid)).flatten(2)  # (B, K, N)
    regions = (pooled * ids.view(1, k, 1)).amax(1).long()
    padded = torch.cat([torch.zeros_like(classes[:, :1]), classes], dim=1)
    return regions, torch.gather(padded, 1, regions)


class LayoutAttentionBlock(nn.Module):
    """Self-attention restricted to each region of a latent grid, with the region's class embedding added.

    Args:
        channels: feature channels at this level.
        embedding_dim: width of the class embeddings.
        num_heads: attention heads (``channels`` must divide by it).

    The input is normalised per token (``LayerNorm`` over channels, not the UNet's GroupNorm over the grid), so a
    token's output depends on the tokens of its own region only.
    """

    def __init__(self, channels: int, embedding_dim: int, num_heads: int = 1) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"layout_num_heads {num_heads} does not divide the {channels} channels of a layout level.")
        self.num_heads = int(num_heads)
        self.norm = nn.LayerNorm(channels)
        self.embed = nn.Linear(embedding_dim, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)  # zero-initialised output: the block starts as the identity
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, regions: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """``x + out(attention)``.

        Args:
            x: ``(B, C, *grid)`` latent features.
            regions: ``(B, N)`` region of each token (:func:`token_regions`); tokens attend within their region.
            embeddings: ``(B, N, embedding_dim)`` class embedding of each token's region.
        """
        b, c = x.shape[:2]
        h = self.norm(x.flatten(2).transpose(1, 2)) + self.embed(embeddings.to(x.dtype))
        q, k, v = (t.reshape(b, -1, self.num_heads, c // self.num_heads).transpose(1, 2)
                   for t in self.qkv(h).chunk(3, dim=-1))
        allowed = (regions[:, :, None] == regions[:, None, :])[:, None]  # (B, 1, N, N): same region only
        attended = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        attended = attended.transpose(1, 2).reshape(b, -1, c)
        return x + self.out(attended).transpose(1, 2).reshape(x.shape)


class LayoutAttention(nn.Module):
    """The trainable part of layout generation: one :class:`LayoutAttentionBlock` per chosen level and the class
    embedding table (row 0: the learned null embedding of the background, row ``j + 1``: ``classes[j]``).

    Level ``l`` is the latent grid downsampled ``l`` times (0: the full latent grid); its block runs on the features
    entering the UNet's decoder stage at that grid (the middle block's output at the deepest level).

    Args:
        channels: the UNet's ``channels`` (``network_def``).
        levels: the levels that get a block.
        classes: the vocabulary (class names).
        embedding_dim: width of the class embeddings.
        num_heads: attention heads of each block.
    """

    def __init__(self, channels: Sequence[int], levels: Sequence[int], classes: Sequence[str],
                 embedding_dim: int = 32, num_heads: int = 1) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        n = len(self.channels)
        self.levels = sorted({int(level) for level in levels})
        if not self.levels or any(not 0 <= level < n for level in self.levels):
            raise ValueError(f"layout_levels {list(levels)} must be non-empty levels of the UNet, 0 to {n - 1}.")
        self.classes = [str(c) for c in classes]
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"layout_classes must be distinct class names, got {list(classes)}.")
        self.class_embedding = nn.Embedding(len(self.classes) + 1, int(embedding_dim))
        self.blocks = nn.ModuleDict({str(level): LayoutAttentionBlock(self.channels[min(level + 1, n - 1)],
                                                                      int(embedding_dim), num_heads)
                                     for level in self.levels})

    @contextlib.contextmanager
    def attached(self, unet: nn.Module, layout: Layout) -> Iterator[nn.Module]:
        """Within the block, ``unet``'s forward runs the layout blocks on ``layout`` (batch as the UNet's input)."""
        up_blocks = getattr(unet, "up_blocks", None)
        if up_blocks is None or len(up_blocks) != len(self.channels):
            raise ValueError(f"the layout blocks were built for a DiffusionModelUNet with {len(self.channels)} levels "
                             f"(channels {self.channels}); this network has "
                             f"{'no up_blocks' if up_blocks is None else f'{len(up_blocks)} levels'}.")
        cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

        def hook_for(level: int) -> Callable:
            block = self.blocks[str(level)]

            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                h = kwargs["hidden_states"]
                grid = tuple(int(s) for s in h.shape[2:])
                if grid not in cache:
                    regions, token_classes = token_regions(layout, grid)
                    cache[grid] = regions, self.class_embedding(token_classes)
                if cache[grid][0].shape[0] != h.shape[0]:
                    raise ValueError(f"the layout holds {cache[grid][0].shape[0]} items, the UNet batch "
                                     f"{h.shape[0]}; give one layout per sample.")
                return args, {**kwargs, "hidden_states": block(h, *cache[grid])}

            return hook

        n = len(self.channels)
        handles = [up_blocks[n - 1 - level].register_forward_pre_hook(hook_for(level), with_kwargs=True)
                   for level in self.levels]
        try:
            yield unet
        finally:
            for handle in handles:
                handle.remove()


class LayoutPrepareBatch(LatentDiffusionPrepareBatch):
    """The stage-2 objective with a box layout: :class:`LatentDiffusionPrepareBatch`'s ``(inputs, target, (), kwargs)``
    plus ``kwargs["layout"]``, the boxes of the batch's label maps (:func:`component_layout`: each connected
    component of each layout class), replaced by the empty layout with ``layout_drop_prob`` per item (the
    unconditional branch of classifier-free guidance).

    Args:
        label_classes: the label vocabulary ``{value: name}`` of the maps.
        layout_classes: the classes that become boxes (names of ``label_classes``), in vocabulary order.
        label_key: batch key of the label maps ``(B, 1, *spatial)`` (image resolution).
        layout_drop_prob: probability of training an item with the empty layout.
        other arguments: see :class:`scripts.diffusion.LatentDiffusionPrepareBatch`.
    """

    def __init__(self, noise_scheduler: nn.Module, scale_factor: float, label_classes: Mapping[Any, str],
                 layout_classes: Sequence[str], label_key: str = "label", layout_drop_prob: float = 0.1,
                 latents: Callable | None = None, condition_name: str | Sequence[str] | None = None,
                 sample_seed: int | None = None) -> None:
        super().__init__(noise_scheduler, scale_factor, latents=latents, condition_name=condition_name,
                         sample_seed=sample_seed)
        values = {name: value for value, name in label_vocabulary(label_classes).items()}
        unknown = [c for c in layout_classes if c not in values]
        if unknown or not layout_classes:
            raise ValueError(f"layout_classes {list(layout_classes)} must name classes of label_classes "
                             f"{list(values)}; fix layout_classes.")
        if not 0.0 <= float(layout_drop_prob) <= 1.0:
            raise ValueError(f"layout_drop_prob must be a probability in [0, 1]; got {layout_drop_prob!r}.")
        self.class_values = [values[c] for c in layout_classes]
        self.label_key = label_key
        self.layout_drop = float(layout_drop_prob)

    def extra_inputs(self, batchdata: dict, latents: torch.Tensor, infer_kwargs: dict,
                     non_blocking: bool = False) -> None:
        label = batch_label_map(batchdata, self.label_key, latents.device, "layout", non_blocking)
        instances, classes = component_layout(label, self.class_values)
        keep = (self._rand((label.shape[0], 1)) >= self.layout_drop).long().to(latents.device)
        infer_kwargs["layout"] = (instances * keep.view(-1, 1, 1, 1, 1), classes * keep)


class LayoutTrainingInferer(ControlNetTrainingInferer):
    """The training forward of layout blocks on a frozen diffusion UNet, with the engine's calling convention
    ``inferer(inputs, network, noise=..., timesteps=..., layout=..., condition=...)``: ``network`` is the
    :class:`LayoutAttention` being trained, ``diffusion_model`` the frozen UNet (MONAI's ``DiffusionInferer``).
    Arguments as :class:`scripts.controlnet.ControlNetTrainingInferer`'s.
    """

    def __init__(self, scheduler: nn.Module, diffusion_model: nn.Module, mode: str = "crossattn") -> None:
        super().__init__(scheduler, diffusion_model, mode)
        self.inferer = DiffusionInferer(scheduler)

    def __call__(self, inputs: torch.Tensor, network: LayoutAttention, noise: torch.Tensor, timesteps: torch.Tensor,
                 layout: Layout, condition: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(network, LayoutAttention):
            raise TypeError(f"layout training runs the LayoutAttention blocks inside the UNet's forward, so they "
                            f"cannot be wrapped ({type(network).__name__}); train in one process (drop the multi-GPU "
                            "overlay).")
        with network.attached(self.diffusion_model, layout):
            return self.inferer(inputs, self.diffusion_model, noise=noise, timesteps=timesteps, condition=condition,
                                mode=self.mode)


def layout_denoiser(pipeline: Any, blocks: LayoutAttention, layout: Layout,
                    guidance_scale: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, t) -> model output`` following ``layout``: the pipeline's UNet with the layout blocks attached; with
    ``guidance_scale != 1``, classifier-free guidance against the empty layout (both branches one batch).

    Raises:
        ValueError: the pipeline has a ControlNet (layouts without ``--paste_onto`` need none).
    """
    from scripts.sampling import classifier_free

    if pipeline.controlnet is not None:
        raise ValueError("layouts without --paste_onto generate through the layout blocks, not the ControlNet: drop "
                         "configs/inference_controlnet.json from --config_file, or give --paste_onto <label map>.")

    def output(x: torch.Tensor, t: torch.Tensor, lay: Layout) -> torch.Tensor:
        with blocks.attached(pipeline.network, lay):
            return pipeline.model_output(x, t, None, None)

    return classifier_free(output, layout, empty_layout(layout), float(guidance_scale))


def check_layout_record(record: Mapping[str, Any], diffusion_path: str, layout_path: str) -> list[str]:
    """The vocabulary of trained layout blocks, after checking they were trained on these diffusion weights.

    Raises:
        FileNotFoundError: no record beside the weights.
        ValueError: the diffusion weights are not those the blocks were trained on, naming both files.
    """
    from scripts.storage import sha256_mismatch

    if not getattr(record, "path", None) or "layout_classes" not in record:
        raise FileNotFoundError(f"no model_layout_record.json with layout_classes beside {layout_path}: train the "
                                "layout blocks first (configs/train_layout.json), or give --paste_onto <label map> to "
                                "generate through the ControlNet.")
    actual = sha256_mismatch(diffusion_path, record.get("diffusion_sha256"))
    if actual:
        raise ValueError(f"the layout blocks {layout_path} were trained on diffusion weights "
                         f"{record.get('diffusion_path')} (sha256 {record.get('diffusion_sha256')}), not on "
                         f"{diffusion_path} (sha256 {actual}): pass --load_diffusion_path of those weights.")
    return list(record["layout_classes"])
