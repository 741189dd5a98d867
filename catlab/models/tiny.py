"""What every tiny random-weight adapter shares: seeded weights built from a config, a hashed prompt encoder.

A tiny adapter shows cost, not quality: plumbing, tests and MAC/timing studies run on it
anywhere, offline. A family's tiny adapter subclasses :class:`TinyAdapter` and says only
what differs: :meth:`~TinyAdapter.build` (its transformer from the fields), its
:meth:`~TinyAdapter.conditioning` (which call arguments the prompt embeddings become),
its scheduler and its ``predict``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from catlab.models.base import Conditioning, ModelAdapter, with_unconditional


class HashedPromptEncoder:
    """A seeded stand-in for a text encoder: each word maps to a fixed random vector.

    Deterministic and offline, so random-weight models run anywhere. It carries no
    meaning; it only gives different prompts different conditioning.
    """

    def __init__(self, seq_len: int, dim: int, pooled_dim: int, seed: int = 0):
        self.seq_len, self.dim, self.pooled_dim, self.seed = seq_len, dim, pooled_dim, seed

    def _word(self, word: str, dim: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(word.encode()) + self.seed)
        return torch.randn(dim, generator=g)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = torch.zeros(len(prompts), self.seq_len, self.dim)
        pooled = torch.zeros(len(prompts), self.pooled_dim)
        for i, prompt in enumerate(prompts):
            words = prompt.lower().split()[: self.seq_len]
            for j, w in enumerate(words):
                embeds[i, j] = self._word(w, self.dim)
                pooled[i] += self._word("<pooled>" + w, self.pooled_dim) / len(words)
        return embeds, pooled


@dataclass
class TinyAdapter(ModelAdapter):
    """A transformer with seeded random weights in pixel space, conditioned by :class:`HashedPromptEncoder`."""

    random_weights = True

    height: int = 32
    width: int = 32
    patch: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    text_dim: int = 64
    text_tokens: int = 16
    weights_seed: int = 0
    transformer: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        torch.manual_seed(self.weights_seed)
        self.transformer = self.build().to(self.torch_device).eval()
        if self.torch_dtype != torch.float32:
            self.transformer.to(dtype=self.torch_dtype)
        self.encoder = HashedPromptEncoder(self.text_tokens, self.text_dim, self.pooled_dim, self.weights_seed)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled prompt vector (1 where the transformer takes none)."""
        return 1

    def build(self) -> nn.Module:
        """The transformer, from the fields (weights drawn after ``torch.manual_seed(weights_seed)``)."""
        raise NotImplementedError

    def conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor) -> dict:
        """The transformer's call arguments for the stacked rows' embeddings (on the model's device and dtype)."""
        raise NotImplementedError

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        embeds, pooled = self.encoder(with_unconditional(prompts, guidance))
        kw = self.conditioning(
            embeds.to(self.torch_device, self.torch_dtype), pooled.to(self.torch_device, self.torch_dtype)
        )
        return Conditioning(kw, 2 if guidance else 1, embeds.shape[1])
