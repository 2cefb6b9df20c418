"""Sampling: the reverse process with any MONAI scheduler, and the pipeline that generation and previews share.

:class:`LatentDiffusionPipeline` holds what sampling needs (the UNet, a scheduler, the decoder, and optionally a
condition with classifier-free guidance, or a ControlNet) and turns starting noise into images. Conditions enter
through one slot, as in training: the ``condition`` tensor that MONAI's ``DiffusionInferer`` passes as
cross-attention ``context`` (``mode="crossattn"``) or concatenates to the input channels (``mode="concat"``).
Every random draw is per sample (:func:`sample_generators`), so a sample depends only on its ``(seed, index)``.

Classifier-free guidance (Ho & Salimans 2022) with a **guidance scale per condition** composes the conditions by
the chain rule, as InstructPix2Pix does for two (Brooks et al. 2023): with the conditions a sample gives, in
declaration order ``c_1..c_m`` and scales ``w_1..w_m``, and ``P_k`` the first ``k`` of them (the rest null),

    eps = eps(P_0) + sum_k w_k * (eps(P_k) - eps(P_{k-1}))      (:func:`guidance_coefficients`)

since ``log p(x | c_1..c_m) = log p(x) + sum_k log p(c_k | x, c_1..c_{k-1})`` up to a constant, each term scaled
by its own weight. All scales 1 is the plain conditional prediction ``eps(P_m)`` (one network call); all 0 the
unconditional one ``eps(P_0)``; equal scales ``w`` standard guidance ``eps(P_0) + w (eps(P_m) - eps(P_0))`` (two
calls); a condition given alone is standard guidance with its own scale. Prefixes whose coefficient is zero are not
evaluated, the others run as one batch: the number of network calls per step is the number of non-zero coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer
from monai.networks.schedulers import DDPMScheduler, PNDMScheduler, RFlowScheduler
from torch import nn

from scripts.conditioning import Conditions
from scripts.engines.base import amp_dtype_of, autocast_context
from scripts.networks import AutoencoderDecoder

__all__ = [
    "LatentDiffusionPipeline", "classifier_free", "decode_latents", "first_given", "guidance_coefficients",
    "initial_noise", "reverse_process", "sample_generators", "sample_latents",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MODES = ("crossattn", "concat")


def sample_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One random generator per sample index, so that sample ``i`` depends only on ``(seed, i)``."""
    return [torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(i)) for i in indices]


def classifier_free(output: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], condition: Any,
                    unconditional: Any, guidance_scale: float) -> Denoiser:
    """``(x, t) -> output(x, t, condition)``; with ``guidance_scale != 1``, classifier-free guidance
    ``out(unconditional) + w * (out(condition) - out(unconditional))``, the two branches run as one batch (2 network
    calls a step). ``condition`` and ``unconditional`` are tensors or tuples of tensors, batched along dimension 0."""
    if guidance_scale == 1.0:
        return lambda x, t: output(x, t, condition)
    if isinstance(condition, tuple):
        both = tuple(torch.cat([u, c]) for u, c in zip(unconditional, condition, strict=True))
    else:
        both = torch.cat([unconditional, condition])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_null, out_condition = output(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return out_null + guidance_scale * (out_condition - out_null)

    return guided


def initial_noise(latent_shape: Sequence[int], indices: Sequence[int], seed: int,
                  device: str | torch.device) -> torch.Tensor:
    """Starting noise ``(len(indices), *latent_shape)``; sample ``i``'s noise depends only on ``(seed, i)``."""
    generators = sample_generators(seed, indices)  # on CPU: the same noise on any device
    return torch.stack([torch.randn(tuple(latent_shape), generator=g) for g in generators]).to(device)


def reverse_process(
    denoise: Denoiser,
    scheduler: nn.Module,
    noise: torch.Tensor,
    num_inference_steps: int,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Run the reverse process from ``noise`` (latent space, ``(B, C, *latent_spatial)``) to clean latents;
    ``denoise(x, timesteps)`` is the model output the scheduler expects.

    Stochastic steps (DDPM, DDIM with eta > 0) draw their noise per sample from ``generators``, so a sample does
    not depend on the batch it was drawn in.
    """
    if isinstance(scheduler, RFlowScheduler):
        scheduler.set_timesteps(num_inference_steps, device=noise.device, input_img_size_numel=int(noise[0, 0].numel()))
    else:
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
    if isinstance(scheduler, PNDMScheduler):  # PNDM keeps a history of model outputs across steps
        scheduler.ets, scheduler.counter, scheduler.cur_sample = [], 0, None
    timesteps = list(scheduler.timesteps)
    steps = zip(timesteps, timesteps[1:] + [0], strict=True)
    if progress:
        from tqdm import tqdm

        steps = tqdm(list(steps), desc=desc, leave=False)
    x = noise
    per_sample = generators is not None and isinstance(scheduler, DDPMScheduler)
    for t, next_t in steps:
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        if not isinstance(scheduler, RFlowScheduler):
            t_batch = t_batch.long()
        with torch.no_grad():
            model_output = denoise(x, t_batch)
        if isinstance(scheduler, RFlowScheduler):
            x, _ = scheduler.step(model_output, t, x, next_t)
        elif per_sample:
            x = torch.cat([scheduler.step(model_output[i : i + 1], t, x[i : i + 1], generator=g)[0]
                           for i, g in enumerate(generators)])
        else:
            x, _ = scheduler.step(model_output, t, x)
    return x


def sample_latents(network: nn.Module, scheduler: nn.Module, noise: torch.Tensor, num_inference_steps: int,
                   generators: Sequence[torch.Generator] | None = None, progress: bool = True,
                   desc: str = "sampling") -> torch.Tensor:
    """Unconditional sampling with ``network(x, timesteps=t)``: :func:`reverse_process` without a pipeline."""
    return reverse_process(lambda x, t: network(x, timesteps=t), scheduler, noise, num_inference_steps, generators,
                           progress, desc)


def decode_latents(
    autoencoder: nn.Module, latents: torch.Tensor, scale_factor: float, inferer: Inferer | None = None
) -> torch.Tensor:
    """Decode diffusion latents to images: ``decoder(latents / scale_factor)``, tiled when ``inferer`` is a
    ``SlidingWindowInferer`` over the latent (its output is upsampled by the autoencoder's factor)."""
    decoder = AutoencoderDecoder(autoencoder, scale_factor).eval()
    with torch.no_grad():
        return (inferer or SimpleInferer())(latents, decoder)


def guidance_coefficients(present: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """The weights of the chain-rule guidance terms: ``(B, n + 1)``, column ``k`` the weight of the prediction
    conditioned on the first ``k`` conditions a sample gives (the rest null).

    Args:
        present: which of the ``n`` conditions each sample gives, bool ``(B, n)``, in declaration order.
        scales: the guidance scale of each condition, ``(n,)``.
    """
    coefficients = torch.zeros(present.shape[0], present.shape[1] + 1)
    for b, row in enumerate(present.tolist()):
        w = [float(scales[i]) for i, given in enumerate(row) if given]
        weights = [1.0 - w[0], *(w[k - 1] - w[k] for k in range(1, len(w))), w[-1]] if w else [1.0]
        coefficients[b, : len(weights)] = torch.tensor(weights)
    return coefficients


def first_given(conditions: Conditions, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Raw rows ``(B, width)`` keeping only the first ``k`` conditions each row gives (the prefix ``P_k``)."""
    present = conditions.present(rows)
    return conditions.with_null(rows, present & (present.cumsum(1) > k))


class LatentDiffusionPipeline:
    """Noise -> latents -> images: the one sampling path of generation and of the training previews.

    Args:
        network: the diffusion UNet (usually the EMA weights), latent space; with ``conditions``, a
            :class:`scripts.conditioning.ConditionedUNet` taking raw condition rows as ``context``.
        scheduler: the sampler (MONAI DDPM/DDIM/PNDM/RFlow scheduler).
        autoencoder: stage-1 autoencoder; its decoder maps ``latent / scale_factor`` to image space.
        scale_factor: the training scale factor.
        num_inference_steps: reverse-process steps.
        decode_inferer: e.g. a ``SlidingWindowInferer`` over the latent for tiled decoding in bounded memory.
        mode: how a condition enters the UNet: ``"crossattn"`` (``context=``) or ``"concat"`` (extra input
            channels), as MONAI's ``DiffusionInferer``.
        guidance_scale: classifier-free guidance weight: one number, or with ``conditions`` a mapping
            condition name -> weight (a name left out: 1). Without ``conditions`` the model output is
            ``uncond + w * (cond - uncond)``; with them, the chain-rule composition of the module docstring. 1
            (default) is plain conditional sampling, one network call a step; 0 unconditional.
        conditions: the declared conditions (:class:`scripts.conditioning.Conditions`): the condition is a raw row
            per sample, NaN where a condition is absent (its null), and guidance is per condition.
        controlnet: a MONAI ``ControlNet`` whose residuals are added to the UNet's (its control image is given
            per call).
        conditioning_scale: weight of the ControlNet residuals.
        amp: autocast the UNet and the decoder; the images are float32.
        amp_dtype: ``"bfloat16"`` or ``"float16"``.
    """

    def __init__(self, network: nn.Module, scheduler: nn.Module, autoencoder: nn.Module, scale_factor: float,
                 num_inference_steps: int, decode_inferer: Inferer | None = None, mode: str = "crossattn",
                 guidance_scale: float | Mapping[str, float] = 1.0, controlnet: nn.Module | None = None,
                 conditioning_scale: float = 1.0, amp: bool = False, amp_dtype: str = "bfloat16",
                 conditions: Conditions | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got '{mode}'.")
        if conditions is not None and mode != "crossattn":
            raise ValueError("declared conditions enter the UNet by cross-attention: drop mode or set it to crossattn.")
        self.network, self.scheduler, self.autoencoder = network, scheduler, autoencoder
        self.scale_factor = float(scale_factor)
        self.num_inference_steps = int(num_inference_steps)
        self.decode_inferer = decode_inferer
        self.mode = mode
        self.conditions = conditions
        if isinstance(guidance_scale, Mapping):
            names = conditions.names if conditions is not None else []
            unknown = sorted(set(guidance_scale) - set(names))
            if unknown:
                raise ValueError(f"guidance_scale names {unknown}, which are not conditions of these weights "
                                 f"({names}); give one number, or a mapping over {names}.")
            self.guidance_scale: float | dict[str, float] = {n: float(guidance_scale.get(n, 1.0)) for n in names}
        else:
            self.guidance_scale = float(guidance_scale)
        self.controlnet = controlnet
        self.conditioning_scale = float(conditioning_scale)
        self.amp = bool(amp)
        self.amp_dtype = amp_dtype_of(amp_dtype)

    def scales(self) -> list[float]:
        """The guidance scale of each declared condition, in declaration order."""
        names = self.conditions.names if self.conditions is not None else [""]
        scale = self.guidance_scale
        return [scale[n] for n in names] if isinstance(scale, dict) else [float(scale)] * len(names)

    def guidance_terms(self, condition: torch.Tensor | None, unconditional: torch.Tensor | None = None
                       ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """The contexts to evaluate and their weights ``(B, len(contexts))``: the model output is
        ``sum_j weights[:, j] * output(context_j)``; contexts of all-zero weight are left out."""
        if condition is None:
            return [None], torch.ones(1, 1)
        if self.conditions is not None:
            coefficients = guidance_coefficients(self.conditions.present(condition), self.scales())
            contexts = [first_given(self.conditions, condition, k) for k in range(coefficients.shape[1])]
        else:
            w = self.scales()[0]
            if w == 1.0:
                return [condition], torch.ones(condition.shape[0], 1)
            if unconditional is None:
                raise ValueError(f"guidance_scale {w} needs the unconditional (null) condition; "
                                 "pass unconditional=..., or set guidance_scale to 1.")
            null = unconditional.to(condition.device, condition.dtype).expand_as(condition)
            contexts, coefficients = [null, condition], torch.tensor([[1.0 - w, w]]).expand(condition.shape[0], 2)
        used = [j for j in range(coefficients.shape[1]) if bool((coefficients[:, j] != 0).any())]
        return [contexts[j] for j in used], coefficients[:, used]

    def network_calls_per_step(self, condition: torch.Tensor | None = None,
                               unconditional: torch.Tensor | None = None) -> int:
        """UNet evaluations per sample and step (batched together): one per guidance term of non-zero weight."""
        return len(self.guidance_terms(condition, unconditional)[0])

    def model_output(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None,
                     control: torch.Tensor | None) -> torch.Tensor:
        """One network output for a batch: the UNet (with the ControlNet's residuals for ``control``), the
        ``condition`` as cross-attention context or concatenated channels; no guidance."""
        kwargs: dict[str, Any] = {}
        if condition is not None and self.mode == "concat":
            x_in = torch.cat([x, condition.to(x.dtype)], dim=1)
        else:
            x_in = x
            if condition is not None:
                kwargs["context"] = condition
        if self.controlnet is not None:
            if control is None:
                raise ValueError("this pipeline has a ControlNet: give its control image (control=...).")
            down, mid = self.controlnet(x=x_in, timesteps=t, controlnet_cond=control,
                                        conditioning_scale=self.conditioning_scale, **kwargs)
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return self.network(x_in, timesteps=t, **kwargs)

    def denoiser(self, condition: torch.Tensor | None = None, unconditional: torch.Tensor | None = None,
                 control: torch.Tensor | None = None) -> Denoiser:
        """``(x, t) -> model output`` for a batch: conditioned on ``condition`` and, with guidance, composed from
        the guidance terms (:meth:`guidance_terms`; ``unconditional``: the null condition, broadcast to the batch,
        when no ``conditions`` are declared), all evaluated in one batch."""
        contexts, weights = self.guidance_terms(condition, unconditional)
        if len(contexts) == 1 and bool((weights == 1).all()):
            return lambda x, t: self.model_output(x, t, contexts[0], control)
        m = len(contexts)
        stacked = torch.cat(contexts)
        stacked_control = None if control is None else torch.cat([control] * m)

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            outputs = self.model_output(torch.cat([x] * m), torch.cat([t] * m), stacked, stacked_control).chunk(m)
            w = weights.to(x.device, torch.float32)  # combined in float32: under bf16 autocast the terms cancel
            return sum(w[:, j].view(-1, *[1] * (x.ndim - 1)) * out.float() for j, out in enumerate(outputs))

        return guided

    def sample(self, noise: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
               condition: torch.Tensor | None = None, unconditional: torch.Tensor | None = None,
               control: torch.Tensor | None = None, progress: bool = True) -> torch.Tensor:
        """Clean latents from ``noise`` ``(B, *latent_shape)``."""
        return reverse_process(self.denoiser(condition, unconditional, control), self.scheduler, noise,
                               self.num_inference_steps, generators, progress,
                               desc=f"sampling ({type(self.scheduler).__name__})")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images from clean latents (tiled by ``decode_inferer`` when given)."""
        return decode_latents(self.autoencoder, latents, self.scale_factor, self.decode_inferer)

    def __call__(self, noise: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
                 condition: torch.Tensor | None = None, unconditional: torch.Tensor | None = None,
                 control: torch.Tensor | None = None, progress: bool = True) -> torch.Tensor:
        """Images ``(B, C, *spatial)``, float32, from starting noise."""
        with autocast_context(noise.device, self.amp, self.amp_dtype):
            latents = self.sample(noise, generators, condition, unconditional, control, progress)
            images = self.decode(latents)
        return images.float()

    def describe(self, condition: torch.Tensor | None = None) -> dict[str, Any]:
        """The sampling settings for a manifest (``network_calls_per_step`` of ``condition``'s batch)."""
        return {"sampler": type(self.scheduler).__name__,
                "prediction_type": str(getattr(self.scheduler, "prediction_type", "")),
                "num_inference_steps": self.num_inference_steps, "scale_factor": self.scale_factor,
                "condition_mode": self.mode, "guidance_scale": self.guidance_scale,
                "guidance": "chain-rule composition, one scale per condition" if self.conditions is not None
                else "uncond + w * (cond - uncond)",
                "network_calls_per_step": self.network_calls_per_step(condition),
                "controlnet": self.controlnet is not None, "amp": self.amp}
