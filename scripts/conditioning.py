"""Conditions declared in config: covariates (continuous or categorical) and text prompts, one null per condition.

A condition is declared by name in ``condition_fields`` (``configs/train_diffusion_conditional.json``)::

    "lesion_count": {"field": "params.lesion_count", "kind": "continuous"},
    "sex": {"field": "sex", "kind": "categorical"},
    "prompt": {"kind": "text", "template": "head MRI, {lesion_count} lesions, {ventricle_volume_ml:size} ventricles"}

``field`` is a datalist field, or a dotted path into a nested record (the demo's ``params.lesion_count``); it
defaults to the name. :func:`fit_conditions` reads the training split once: a continuous condition keeps its mean,
standard deviation, range and terciles (normalised as ``(v - mean) / std``), a categorical one its vocabulary, a
text prompt (from a datalist ``field`` or a ``template`` over the other conditions) its word vocabulary. The
:class:`Conditions` go into the training record beside the weights, so generation encodes exactly as training did.
A user's own column needs no code: add it to the datalist and declare it.

**The raw condition row** that travels through the one condition slot (datalist item -> batch ``condition`` ->
``DiffusionInferer(condition=...)`` -> :class:`ConditionedUNet` ``context``) is a float vector ``(width,)``: one
column per covariate (normalised value, or category index) and ``max_tokens`` columns of token ids per prompt. NaN
in a condition's columns means *absent*: the encoder puts that condition's learned null token(s) there. Training
drops each condition independently with its ``drop_prob`` (:meth:`Conditions.drop`), so any subset can be given at
inference, and none at all samples unconditionally from the same weights.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scripts import text

__all__ = [
    "KINDS", "ConditionEncoder", "ConditionedUNet", "Conditions", "check_network_matches_record", "condition_samples",
    "fit_conditions", "read_condition_table",
]

KINDS = ("continuous", "categorical", "text")
#: how far beyond the training range a requested value may lie, as a fraction of that range (``condition_margin``)
DEFAULT_MARGIN = 0.1


def field_value(item: Mapping[str, Any], field: str) -> Any:
    """``item[field]``, following a dotted path into nested records (``params.lesion_count``); ``None`` if absent."""
    value: Any = item
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _drop_probs(names: Sequence[str], cond_drop_prob: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(cond_drop_prob, Mapping):
        unknown = sorted(set(cond_drop_prob) - set(names))
        if unknown:
            raise ValueError(f"cond_drop_prob names {unknown}, which condition_fields lacks ({list(names)}).")
        probs = {n: float(cond_drop_prob.get(n, 0.1)) for n in names}
    else:
        probs = {n: float(cond_drop_prob) for n in names}
    bad = {n: p for n, p in probs.items() if not 0.0 <= p <= 1.0}
    if bad:
        raise ValueError(f"cond_drop_prob must be in [0, 1] for every condition, got {bad}.")
    return probs


def fit_conditions(condition_fields: Mapping[str, Mapping[str, Any]], items: Sequence[Mapping[str, Any]],
                   cond_drop_prob: float | Mapping[str, float] = 0.1) -> Conditions:
    """Fit the declared conditions on the training split: statistics of the continuous ones, vocabularies of the
    categorical ones and of the prompts.

    Args:
        condition_fields: name -> ``{"field": <datalist field or dotted path>, "kind": continuous|categorical|text}``
            (a prompt takes ``field`` or ``template``, and optionally ``max_tokens``), in the order of the guidance
            chain (see :func:`scripts.sampling.guidance_coefficients`).
        items: the training datalist items, nested records kept.
        cond_drop_prob: probability that training drops a condition to its null, one number or name -> number.

    Raises:
        ValueError: an unknown kind or key, a field no training item carries, a non-numeric continuous value, a
            template naming an undeclared condition; one line naming ``condition_fields#<name>``.
    """
    if not condition_fields:
        raise ValueError("condition_fields is empty: declare at least one condition, e.g. "
                         "{\"lesion_count\": {\"field\": \"params.lesion_count\", \"kind\": \"continuous\"}}.")
    probs = _drop_probs(list(condition_fields), cond_drop_prob)
    specs: list[dict[str, Any]] = []
    for name, declared in condition_fields.items():
        where = f"condition_fields#{name}"
        unknown = sorted(set(declared) - {"field", "kind", "template", "max_tokens"})
        kind = declared.get("kind", "continuous")
        if unknown or kind not in KINDS:
            raise ValueError(f"{where}: keys are field, kind ({'|'.join(KINDS)}), and for text template and "
                             f"max_tokens; got {sorted(declared)} with kind '{kind}'.")
        spec: dict[str, Any] = {"name": name, "kind": kind, "drop_prob": probs[name]}
        if kind == "text" and "template" in declared:
            spec["template"] = str(declared["template"])
            spec["terciles"] = {}
        else:
            spec["field"] = str(declared.get("field", name))
            values = [field_value(item, spec["field"]) for item in items]
            present = [v for v in values if v is not None]
            if not present:
                fields = sorted({k for item in items for k in item})
                raise ValueError(f"{where}: no training item has the field '{spec['field']}' (items have {fields}; "
                                 "a nested value is reached with a dotted path, e.g. params.lesion_count).")
            if kind == "continuous":
                try:
                    numbers = np.asarray([float(v) for v in present], dtype=np.float64)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{where}: field '{spec['field']}' holds non-numeric values ({e}); declare it "
                                     "\"kind\": \"categorical\".") from e
                spec.update(mean=float(numbers.mean()), std=float(numbers.std()) or 1.0, min=float(numbers.min()),
                            max=float(numbers.max()), integer=bool(np.all(numbers == np.round(numbers))),
                            terciles=[float(q) for q in np.quantile(numbers, [1 / 3, 2 / 3])])
            elif kind == "categorical":
                spec["vocabulary"] = sorted({str(v) for v in present})
        specs.append(spec)
    by_name = {s["name"]: s for s in specs}
    for spec in specs:
        if spec["kind"] != "text":
            continue
        if "template" in spec:
            for ref in text.template_fields(spec["template"]):
                if ref not in by_name or by_name[ref]["kind"] == "text":
                    raise ValueError(f"condition_fields#{spec['name']}: the template names '{ref}', which is not a "
                                     f"declared covariate ({[s['name'] for s in specs if s['kind'] != 'text']}).")
                if "terciles" in by_name[ref]:
                    spec["terciles"][ref] = by_name[ref]["terciles"]
        prompts = [p for p in (Conditions(specs).prompt_of(spec, item) for item in items) if p]
        counts = [str(k) for ref in text.template_fields(spec.get("template", "")) if by_name[ref].get("integer")
                  for k in range(int(by_name[ref]["min"]), int(by_name[ref]["max"]) + 1)]  # every count in range
        spec["vocabulary"] = text.vocabulary(prompts, counts)
        longest = max((len(text.tokenize(p)) for p in prompts), default=1)
        spec["max_tokens"] = int(condition_fields[spec["name"]].get("max_tokens", longest))
    return Conditions(specs)


class Conditions:
    """The fitted conditions (a list of JSON-able specs, stored in the training record under ``conditions``) and
    the raw condition rows they define.

    Args:
        specs: one dict per condition, in declaration order (:func:`fit_conditions`).
        margin: at inference, refuse a continuous value beyond the training range by more than this fraction of it.
    """

    def __init__(self, specs: Sequence[Mapping[str, Any]], margin: float = DEFAULT_MARGIN) -> None:
        self.specs = [dict(s) for s in specs]
        self.names = [s["name"] for s in self.specs]
        self.margin = float(margin)
        self.slices: dict[str, slice] = {}
        start = 0
        for spec in self.specs:
            width = int(spec.get("max_tokens", 1)) if spec["kind"] == "text" else 1
            self.slices[spec["name"]] = slice(start, start + width)
            start += width
        self.width = start

    @classmethod
    def from_record(cls, record: Mapping[str, Any], margin: float = DEFAULT_MARGIN) -> Conditions:
        """The conditions a training record holds.

        Raises:
            ValueError: the record holds none: the weights are unconditional.
        """
        specs = record.get("conditions")
        if not specs:
            where = getattr(record, "path", None) or "no training record was found"
            raise ValueError(f"the training record ({where}) declares no conditions: these weights are "
                             "unconditional; generate without configs/inference_conditional.json, or train with "
                             "configs/train_diffusion_conditional.json.")
        return cls(specs, margin)

    def to_record(self) -> list[dict[str, Any]]:
        """The specs, JSON-able, for the training record."""
        return [dict(s) for s in self.specs]

    def spec(self, name: str) -> dict[str, Any]:
        return self.specs[self.names.index(name)]

    # ---- values -> raw rows -----------------------------------------------------------------------------------

    def prompt_of(self, spec: Mapping[str, Any], item: Mapping[str, Any]) -> str | None:
        """A text condition's prompt for a datalist item: its field, or its template over the item's covariates."""
        if "template" in spec:
            values = {n: field_value(item, s.get("field", n)) for n, s in zip(self.names, self.specs, strict=True)
                      if s["kind"] != "text"}
            return text.fill_template(spec["template"], values, spec.get("terciles", {}))
        value = field_value(item, spec["field"])
        return None if value is None else str(value)

    def _columns(self, spec: Mapping[str, Any], value: Any, source: str, check: bool) -> list[float]:
        """The raw columns of one condition's value (NaN: absent)."""
        name, kind = spec["name"], spec["kind"]
        if kind == "text":
            if value is None or value == "":
                return [math.nan] * int(spec["max_tokens"])
            return [float(i) for i in text.encode(str(value), spec["vocabulary"], int(spec["max_tokens"]),
                                                   f"{source}: condition '{name}'", strict=check)]
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return [math.nan]
        if kind == "categorical":
            if str(value) not in spec["vocabulary"]:
                raise ValueError(f"{source}: '{value}' is not a category of condition '{name}' (the training split "
                                 f"has {spec['vocabulary']}).")
            return [float(spec["vocabulary"].index(str(value)))]
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: condition '{name}' is continuous; '{value}' is not a number.") from None
        if check:
            span = (spec["max"] - spec["min"]) or abs(spec["max"]) or 1.0
            low, high = spec["min"] - self.margin * span, spec["max"] + self.margin * span
            if not low <= number <= high:
                raise ValueError(f"{source}: {name}={number:g} is outside the training range [{spec['min']:g}, "
                                 f"{spec['max']:g}] by more than the margin ({self.margin:g} of the range: "
                                 f"[{low:g}, {high:g}]); ask for a value in it, or widen --condition_margin.")
        return [(number - spec["mean"]) / spec["std"]]

    def item_row(self, item: Mapping[str, Any]) -> torch.Tensor:
        """The raw row ``(width,)`` of a training or validation item (a missing value is that condition's null)."""
        cols: list[float] = []
        for spec in self.specs:
            value = self.prompt_of(spec, item) if spec["kind"] == "text" else field_value(item, spec["field"])
            cols += self._columns(spec, value, f"datalist item {item.get('image', '')}", check=False)
        return torch.tensor(cols, dtype=torch.float32)

    def rows(self, requests: Sequence[Mapping[str, Any] | None], source: str = "condition") -> torch.Tensor:
        """Raw rows ``(B, width)`` of requested values (name -> value; a name left out takes its null).

        Raises:
            ValueError: an unknown name, an unknown category, a continuous value out of range, an unknown word;
                one line naming ``source``.
        """
        out = []
        for request in requests:
            request = dict(request or {})
            unknown = sorted(set(request) - set(self.names))
            if unknown:
                raise ValueError(f"{source}: unknown condition(s) {unknown}; the weights were trained with "
                                 f"{self.names}.")
            cols: list[float] = []
            for spec in self.specs:
                cols += self._columns(spec, request.get(spec["name"]), source, check=True)
            out.append(cols)
        return torch.tensor(out, dtype=torch.float32).reshape(len(out), self.width)

    def attach(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Datalist items with their raw row under ``condition`` and without nested records (which batches cannot
        collate): what stage 2's dataset carries to the objective."""
        return [{**{k: v for k, v in item.items() if not isinstance(v, (dict, list))}, "condition": self.item_row(item)}
                for item in items]

    # ---- rows: presence, dropout, guidance prefixes -------------------------------------------------------------

    def present(self, rows: torch.Tensor) -> torch.Tensor:
        """Which conditions each row gives, bool ``(B, n)``."""
        return torch.stack([~torch.isnan(rows[:, self.slices[n]]).any(1) for n in self.names], dim=1)

    def drop(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Rows with each condition independently set to its null with its ``drop_prob`` (classifier-free guidance
        training, Ho & Salimans 2022, with one null per condition)."""
        probs = torch.tensor([s["drop_prob"] for s in self.specs])
        dropped = torch.rand((rows.shape[0], len(self.names)), generator=generator) < probs
        return self.with_null(rows, dropped.to(rows.device))

    def with_null(self, rows: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        """Rows with condition ``j`` of row ``b`` set to its null where ``null[b, j]`` (bool ``(B, n)``)."""
        out = rows.clone()
        for j, name in enumerate(self.names):
            cols = out[:, self.slices[name]]
            cols[null[:, j]] = math.nan
        return out

    def describe_row(self, row: torch.Tensor) -> dict[str, Any]:
        """The values a raw row ``(width,)`` asks for (name -> value), absent conditions left out."""
        out: dict[str, Any] = {}
        for spec in self.specs:
            cols = row[self.slices[spec["name"]]]
            if torch.isnan(cols).any():
                continue
            if spec["kind"] == "text":
                out[spec["name"]] = text.decode(cols.long().tolist(), spec["vocabulary"])
            elif spec["kind"] == "categorical":
                out[spec["name"]] = spec["vocabulary"][int(cols[0])]
            else:
                out[spec["name"]] = round(float(cols[0]) * spec["std"] + spec["mean"], 6) + 0.0  # no -0.0
        return out


class ConditionEncoder(nn.Module):
    """Raw condition rows ``(B, width)`` -> cross-attention tokens ``(B, T, dim)``: one token per covariate and one
    per prompt word, each absent condition (NaN) replaced by its own learned null token(s).

    A continuous covariate passes through a two-layer MLP of its normalised value, a categorical one through an
    embedding of its index, a prompt through :class:`scripts.text.TextEncoder`. Trained jointly with the UNet
    (:class:`ConditionedUNet` holds both, so the optimiser, the EMA and the weight files cover it).

    Args:
        conditions: the fitted conditions.
        dim: token width, the UNet's ``cross_attention_dim``.
        text_layers: transformer layers of a prompt encoder.
        text_heads: its attention heads.
    """

    def __init__(self, conditions: Conditions, dim: int = 64, text_layers: int = 2, text_heads: int = 4) -> None:
        super().__init__()
        self.conditions = conditions
        embeds, nulls = [], []
        for spec in conditions.specs:
            if spec["kind"] == "continuous":
                embeds.append(nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim)))
            elif spec["kind"] == "categorical":
                embeds.append(nn.Embedding(len(spec["vocabulary"]), dim))
            else:
                embeds.append(text.TextEncoder(len(spec["vocabulary"]), int(spec["max_tokens"]), dim, text_layers,
                                               text_heads))
            width = conditions.slices[spec["name"]].stop - conditions.slices[spec["name"]].start
            nulls.append(nn.Parameter(torch.randn(width, dim) * 0.02))
        self.embeds = nn.ModuleList(embeds)
        self.nulls = nn.ParameterList(nulls)
        self.num_tokens = conditions.width

    def null_rows(self, batch: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """All-absent raw rows ``(batch, width)``: the unconditional input."""
        return torch.full((batch, self.conditions.width), math.nan, device=device)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        tokens = []
        rows = rows.float()
        for spec, embed, null in zip(self.conditions.specs, self.embeds, self.nulls, strict=True):
            cols = rows[:, self.conditions.slices[spec["name"]]]
            absent = torch.isnan(cols).any(1)
            filled = torch.nan_to_num(cols, nan=0.0)
            if spec["kind"] == "continuous":
                token = embed(filled)[:, None]
            elif spec["kind"] == "categorical":
                token = embed(filled[:, 0].long().clamp(0, embed.num_embeddings - 1))[:, None]
            else:
                token = embed(filled)
            token = torch.where(absent[:, None, None], null.to(token.dtype).expand_as(token), token)
            tokens.append(token)
        return torch.cat(tokens, dim=1)


class ConditionedUNet(nn.Module):
    """The diffusion UNet with its condition encoder: ``forward(x, timesteps, context=rows)`` encodes the raw rows
    ``(B, width)`` into tokens and passes them to MONAI's ``DiffusionModelUNet(with_conditioning=True)`` as its
    cross-attention ``context``; ``context=None`` is the all-null (unconditional) input. One module, so that the
    optimiser, the EMA copy, the checkpoints and ``model.pt``/``model_ema.pt`` hold the encoder with the UNet.

    Args:
        unet: ``DiffusionModelUNet`` with ``with_conditioning=True`` and ``cross_attention_dim`` = the encoder's dim.
        encoder: the :class:`ConditionEncoder`.
    """

    def __init__(self, unet: nn.Module, encoder: ConditionEncoder) -> None:
        super().__init__()
        self.unet = unet
        self.encoder = encoder

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if context is None:
            context = self.encoder.null_rows(x.shape[0], x.device)
        return self.unet(x, timesteps=timesteps, context=self.encoder(context.to(x.device)), **kwargs)


def check_network_matches_record(record: Mapping[str, Any], network: nn.Module) -> bool:
    """Refuse to sample conditional weights with the unconditional network, before their keys fail to load.

    Raises:
        ValueError: the training record declares conditions and ``network`` is not a :class:`ConditionedUNet`.
    """
    if record.get("conditions") and not isinstance(network, ConditionedUNet):
        names = [s["name"] for s in record["conditions"]]
        raise ValueError(f"the diffusion weights were trained with the conditions {names} (training record "
                         f"{getattr(record, 'path', '')}): add configs/inference_conditional.json to --config_file "
                         "(with no --condition it samples unconditionally).")
    return True


# ---- generation inputs ------------------------------------------------------------------------------------------

def read_condition_table(path: str) -> list[dict[str, Any]]:
    """Rows of a condition table: a CSV with a header (an empty cell: that condition's null) or a JSON list of
    objects, one row per sample.

    Raises:
        ValueError: the file is missing, empty or not a table; one line.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"condition_table '{path}' does not exist; give a CSV or JSON file, one row per sample.")
    if file.suffix.lower() == ".json":
        rows = json.loads(file.read_text())
        if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
            raise ValueError(f"condition_table '{path}' must hold a JSON list of objects (one per sample).")
    else:
        with open(file, newline="") as f:
            rows = [{k.strip(): v for k, v in row.items() if v is not None and v.strip() != ""}
                    for row in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"condition_table '{path}' holds no rows.")
    return [dict(r) for r in rows]


def condition_samples(conditions: Conditions, num_samples: int, seed: int = 0,
                      condition: Mapping[str, Any] | None = None, condition_table: str | None = None
                      ) -> list[dict[str, Any]]:
    """The samples of a conditional generation run (the workflow's ``dataset``): ``{"index", "seed",
    "condition"}`` with the requested values of each sample. ``condition`` applies to every sample; a table gives
    one row per sample (its values win over ``condition``'s) and sets the number of samples.

    Every request is checked here, before any sampling (:meth:`Conditions.rows`).

    Raises:
        ValueError: an unknown condition, category or word, or a value out of the training range; one line.
    """
    common = dict(condition or {})
    conditions.rows([common], "condition")
    requests = [common] * int(num_samples)
    if condition_table:
        requests = [{**common, **row} for row in read_condition_table(condition_table)]
        for i, request in enumerate(requests):
            conditions.rows([request], f"condition_table {condition_table}, sample {i}")
    return [{"index": i, "seed": int(seed), "condition": request} for i, request in enumerate(requests)]
