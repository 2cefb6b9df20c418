"""Text prompts, fully offline: a word-level tokenizer, prompt templates over covariates, and a small transformer.

The vocabulary is built from the training prompts and stored with the weights (in the training record, see
:mod:`scripts.conditioning`), so generation tokenises exactly as training did and never fetches anything. A prompt
is lower-cased and split into words and numbers (``"head MRI, 2 lesions"`` -> ``head mri 2 lesions``); punctuation
carries no token. Prompts come from a datalist field or from a template over the covariates, e.g.
``"head MRI, {lesion_count} lesions, {ventricle_volume_ml:size} ventricles"``, where ``{name}`` is the value
(integers without decimals) and ``{name:size}`` is ``small``, ``medium`` or ``large`` by the training split's
terciles of that covariate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "PAD", "SIZE_WORDS", "UNK", "TextEncoder", "decode", "encode", "fill_template",
    "template_fields", "tokenize", "vocabulary",
]

#: token id 0 pads a prompt to ``max_tokens``; id 1 stands for a word training never saw (in validation prompts)
PAD, UNK = "<pad>", "<unk>"
#: the words of ``{name:size}`` in a template, by tercile of the training values
SIZE_WORDS = ("small", "medium", "large")
_WORD = re.compile(r"[a-z]+|\d+(?:\.\d+)?")
_FIELD = re.compile(r"\{([A-Za-z_][\w.]*)(?::(size))?\}")


def tokenize(text: str) -> list[str]:
    """The words of ``text``: lower-cased letters and numbers, punctuation dropped."""
    return _WORD.findall(str(text).lower())


def vocabulary(prompts: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The vocabulary of the training prompts (and ``extra`` words): :data:`PAD`, :data:`UNK`, then every word,
    sorted."""
    return [PAD, UNK, *sorted({w for p in prompts for w in tokenize(p)} | {str(w) for w in extra})]


def encode(text: str, vocab: Sequence[str], max_tokens: int, source: str = "prompt", strict: bool = True
           ) -> list[int]:
    """Token ids of ``text``, padded with 0 to ``max_tokens``; a word the vocabulary lacks is refused (``strict``)
    or encoded as :data:`UNK` (validation prompts), extra words are cut (not ``strict``).

    Raises:
        ValueError: with ``strict``, a word the vocabulary lacks, or more words than ``max_tokens``; one line
            naming ``source``.
    """
    index = {w: i for i, w in enumerate(vocab)}
    words = tokenize(text)
    unknown = [w for w in words if w not in index or w in (PAD, UNK)]
    if not strict:
        return ([index.get(w, 1) for w in words] + [0] * max_tokens)[:max_tokens]
    if unknown:
        raise ValueError(f"{source}: the word(s) {unknown} of '{text}' are not in the prompt vocabulary stored with "
                         f"the weights ({len(vocab) - 2} words, e.g. {list(vocab[2:10])}); use words of the training "
                         "prompts.")
    if len(words) > max_tokens:
        raise ValueError(f"{source}: '{text}' has {len(words)} words, more than the {max_tokens} the model was "
                         "trained with; shorten it.")
    return [index[w] for w in words] + [0] * (max_tokens - len(words))


def decode(ids: Sequence[int], vocab: Sequence[str]) -> str:
    """The words of token ids (pads dropped), joined by spaces: ``decode(encode(t)) == " ".join(tokenize(t))``."""
    return " ".join(vocab[int(i)] for i in ids if int(i) != 0)


def template_fields(template: str) -> list[str]:
    """The covariate names a template reads (``{name}`` and ``{name:size}``)."""
    return [m.group(1) for m in _FIELD.finditer(template)]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{float(value):g}"


def fill_template(template: str, values: Mapping[str, Any], terciles: Mapping[str, Sequence[float]]) -> str | None:
    """The prompt of one item: ``template`` with each ``{name}`` replaced by its value and ``{name:size}`` by
    ``small``/``medium``/``large`` (below the first tercile, between, above the second); ``None`` when a value the
    template reads is missing (the item's prompt is then null)."""
    if any(values.get(name) is None for name in template_fields(template)):
        return None

    def word(match: re.Match) -> str:
        value = values[match.group(1)]
        if match.group(2) == "size":
            low, high = terciles[match.group(1)]
            return SIZE_WORDS[0] if float(value) < low else SIZE_WORDS[2] if float(value) > high else SIZE_WORDS[1]
        return _number(value) if isinstance(value, (int, float)) else str(value)

    return _FIELD.sub(word, template)


class TextEncoder(nn.Module):
    """Token ids ``(B, L)`` -> one cross-attention token per word ``(B, L, dim)``: word and position embeddings and
    a small pre-norm transformer encoder (Vaswani et al. 2017), trained jointly with the UNet. Padding is masked in
    self-attention and its output tokens are zero.

    Args:
        vocab_size: words including the pad token.
        max_tokens: ``L``.
        dim: token width (the UNet's ``cross_attention_dim``).
        layers: transformer layers.
        heads: attention heads (``dim`` must divide by it).
    """

    def __init__(self, vocab_size: int, max_tokens: int, dim: int, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        pad = ids == 0
        pad[:, 0] = False  # an empty prompt still attends somewhere (its row is replaced by the null tokens)
        tokens = self.transformer(self.words(ids) + self.position[: ids.shape[1]], src_key_padding_mask=pad)
        return tokens.masked_fill(pad[..., None], 0.0)

