"""Text side of the embedded model: a word-level tokenizer and a small CLIP-style text encoder.

The tokenizer is a `tokenizers` WordLevel model over the world's vocabulary,
saved as `tokenizer.json` and loaded with `transformers.PreTrainedTokenizerFast`.
The encoder is built from a config and trained jointly with the denoiser; it
gives per-token states (the transformer's `encoder_hidden_states`) and a pooled
vector (`pooled_projections`). `encoder="clip"` is a causal
`CLIPTextModelWithProjection` (pooled = projected EOS state); `encoder="bert"`
(the shipped bundle, see docs/model_card.md) is a bidirectional `BertModel`
(pooled = its pooler over the first token), in which an object's colour and
shape words also see the position words after them.
"""

from __future__ import annotations

import re
import string
import warnings
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from catlab.embedded.world import vocabulary

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
# CLIP treats eos_token_id == 2 as a legacy special case, so keep EOS at id 3.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)


@dataclass
class TextConfig:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 24  # every prompt is padded / truncated to this many tokens
    encoder: str = "clip"  # clip: causal, as SD3's CLIP encoders; bert: bidirectional

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"text.encoder must be one of {sorted(ENCODERS)}; got {self.encoder!r}")


def build_tokenizer(max_length: int = 24, words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lower-cases, drops punctuation, adds <bos>/<eos>, pads to max_length.

    ``words`` is the vocabulary (default: the image world's; the video world passes its own)."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *(words or vocabulary())])}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )


def unknown_words(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[str]:
    """Words of `prompt` that are not in the tokenizer's vocabulary."""
    backend = tokenizer.backend_tokenizer
    text = backend.normalizer.normalize_str(prompt)
    words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    vocab = tokenizer.get_vocab()
    return [w for w in words if w not in vocab]


def dropped_characters(prompt: str) -> list[str]:
    """Characters the tokenizer's normaliser removes without a trace: neither word characters, spaces
    nor ASCII punctuation (emoji, symbols, other scripts' punctuation)."""
    return sorted({c for c in prompt if re.fullmatch(r"[^\w\s]", c) and c not in string.punctuation})


def tokenize(tokenizer: PreTrainedTokenizerFast, prompts: list[str], warn: bool = True) -> torch.Tensor:
    """Token ids (B, max_length); warns, naming them, when prompts hold unknown words, lose characters
    (emoji, symbols) or are cut to ``max_length`` tokens (Python shows each distinct warning once)."""
    if warn:
        dropped = sorted({c for p in prompts for c in dropped_characters(p)})
        if dropped:
            warnings.warn(
                f"embedded model: characters {dropped} are dropped from the prompts (its tokenizer "
                "keeps letters, digits and spaces; ASCII punctuation separates words)",
                stacklevel=3,
            )
        unknown = sorted({w for p in prompts for w in unknown_words(tokenizer, p)})
        if unknown:
            warnings.warn(
                f"embedded model: unknown words {unknown} are mapped to {UNK}; its vocabulary is {_words(tokenizer)}",
                stacklevel=3,
            )
        limit = tokenizer.model_max_length
        long = [p for p in prompts if len(tokenizer(p)["input_ids"]) > limit]
        if long:
            warnings.warn(
                f"embedded model: {len(long)} prompt(s) longer than its {limit} text tokens are cut, "
                f"e.g. {long[0][:80]!r}",
                stacklevel=3,
            )
    out = tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    return out["input_ids"]


def _words(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """The tokenizer's words in id order, special tokens left out."""
    vocab = tokenizer.get_vocab()
    return sorted((w for w in vocab if w not in SPECIAL_TOKENS), key=vocab.get)


def build_text_encoder(cfg: TextConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A fresh text transformer of kind ``cfg.encoder`` (see the module docstring)."""
    common = dict(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.encoder == "bert":
        return BertModel(BertConfig(**common, type_vocab_size=1), add_pooling_layer=True)
    config = CLIPTextConfig(
        **common,
        projection_dim=cfg.hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModelWithProjection(config)


def pooled_dim(text_encoder: PreTrainedModel) -> int:
    """Width of the pooled vector :func:`encode_ids` returns."""
    return getattr(text_encoder.config, "projection_dim", None) or text_encoder.config.hidden_size


def encode_ids(text_encoder: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token states (B, L, hidden), pooled vector (B, pooled_dim))."""
    ids = ids.to(text_encoder.device)
    if isinstance(text_encoder, BertModel):  # bidirectional: padding must not be attended to
        out = text_encoder(input_ids=ids, attention_mask=(ids != text_encoder.config.pad_token_id).long())
        return out.last_hidden_state, out.pooler_output
    out = text_encoder(input_ids=ids)
    return out.last_hidden_state, out.text_embeds


ENCODERS = {"clip": CLIPTextModelWithProjection, "bert": BertModel}
