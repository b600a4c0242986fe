"""tiny-mmdit's own tokenizer (word level) and text encoder (a 2-layer transformer).

The encoder plays the part of SD3's text encoders: it returns per-token hidden states
(``encoder_hidden_states`` for the joint attention) and a pooled vector
(``pooled_projections`` for the timestep/adaLN conditioning). It is trained jointly with
the diffusion transformer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ditlens.errors import DitlensError

from .data import COLOUR_NAMES, FASHION_CLASSES, REGION_NAMES

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
VOCAB_NAME = "vocab.json"
# Words are runs of letters/digits/hyphens; a comma is a token of its own.
_WORD_PATTERN = re.compile(r"[a-z0-9\-]+|,")


def default_vocabulary() -> list[str]:
    """Special tokens, then every word the scene captions use, in a fixed order."""
    words: list[str] = [PAD_TOKEN, BOS_TOKEN, UNK_TOKEN, "a", "and", ","]
    for phrase in (*COLOUR_NAMES, *FASHION_CLASSES, *REGION_NAMES):
        for word in phrase.split():
            if word not in words:
                words.append(word)
    return words


@dataclass
class TokenizerOutput:
    """Token ids [B, L] (int64) and the attention mask [B, L] (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class WordTokenizer:
    """Lower-cases, splits into words and commas, prepends <bos>, pads to ``max_length``.

    Unknown words become <unk>; captions longer than ``max_length`` are cut (like CLIP's
    tokenizer with truncation). The empty caption is just <bos>, which is what CFG uses.
    """

    def __init__(self, vocabulary: list[str], max_length: int = 32) -> None:
        if vocabulary[:3] != [PAD_TOKEN, BOS_TOKEN, UNK_TOKEN]:
            raise DitlensError("a tokenizer vocabulary must start with <pad>, <bos>, <unk>")
        self.vocabulary = list(vocabulary)
        self.token_to_id = {word: index for index, word in enumerate(self.vocabulary)}
        self.max_length = max_length
        self.pad_token_id = 0
        self.bos_token_id = 1
        self.unk_token_id = 2

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def words(self, text: str) -> list[str]:
        return _WORD_PATTERN.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        ids = [self.bos_token_id] + [self.token_to_id.get(word, self.unk_token_id) for word in self.words(text)]
        return ids[: self.max_length]

    def __call__(self, texts: str | list[str]) -> TokenizerOutput:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = self.encode(text)
            ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
            mask[row, : len(encoded)] = 1
        return TokenizerOutput(input_ids=ids, attention_mask=mask)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"vocabulary": self.vocabulary, "max_length": self.max_length}
        (folder / VOCAB_NAME).write_text(json.dumps(payload, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, **_: object) -> "WordTokenizer":
        path = Path(folder) / VOCAB_NAME
        if not path.is_file():
            raise DitlensError(f"no tokenizer vocabulary at {path}")
        payload = json.loads(path.read_text())
        return cls(payload["vocabulary"], int(payload["max_length"]))


class _EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer with a key-padding mask."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(ModelMixin, ConfigMixin):
    """Token embeddings + learned positions, a few transformer layers, two projections.

    Returns ``(hidden_states [B, L, joint_dim], pooled [B, pooled_dim])``; the pooled vector is
    the masked mean of the final hidden states, projected.
    """

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 40,
        max_length: int = 32,
        width: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        joint_attention_dim: int = 128,
        pooled_projection_dim: int = 128,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, width))
        # At the token embeddings' scale (N(0, 1)): at 0.02 the pre-norm layers barely see word
        # order, and a caption becomes a bag of words that cannot say which item goes where.
        nn.init.normal_(self.position_embedding, std=1.0)
        self.layers = nn.ModuleList([_EncoderLayer(width, num_heads) for _ in range(num_layers)])
        self.final_norm = nn.LayerNorm(width)
        self.hidden_projection = nn.Linear(width, joint_attention_dim)
        self.pooled_projection = nn.Linear(width, pooled_projection_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.position_embedding[:, :length]
        padding = attention_mask == 0
        for layer in self.layers:
            x = layer(x, padding)
        x = self.final_norm(x)
        weights = attention_mask.to(x.dtype)[..., None]
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.hidden_projection(x), self.pooled_projection(pooled)
