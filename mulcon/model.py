"""MulCon and the Baseline of Table 3 (paper section 2.2, Figure 1).

MulCon = CNN encoder (tokens r_i, Eq. 6) -> LabelAttention (label-level embeddings g_i, Eq. 2, 3, 6)
-> one linear classifier per label (s_ij) and a two-layer projector (z_ij, section 2.2).
`model.attention_block=authors` builds the attention block of the authors' public code instead
(AuthorsBlock, with their label queries and initialisation; REFERENCE.md lists the differences).
The Baseline is the backbone with global average pooling, one linear classifier and an
image-level projector for the image-level SupCon ablation ("Backbone with BCE + SCL").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mulcon.backbones import build_backbone
from mulcon.config import ModelConfig
from mulcon.errors import ConfigError

logger = logging.getLogger(__name__)

ATTENTION_SCALES = ("none", "head", "full")
ATTENTION_BLOCKS = ("paper", "authors")
INIT_STD = 0.02  # the authors' normal(0, 0.02) of attention, classifier and projector weights


def _scale(attention_scale: str, embed_dim: int, num_heads: int) -> float:
    if attention_scale == "none":  # Eq. 1: softmax(QK^T), no scaling
        return 1.0
    if attention_scale == "head":  # the transformer's 1/sqrt(d_head)
        return 1.0 / math.sqrt(embed_dim // num_heads)
    if attention_scale == "full":  # the authors' code: 1/sqrt(D), the full width
        return 1.0 / math.sqrt(embed_dim)
    raise ConfigError(f"model.attention_scale: {attention_scale!r} is not one of {', '.join(ATTENTION_SCALES)}")


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)  # (B, h, n, D/h)


def _attend(query, key, value, num_heads: int, scale: float, need_weights: bool):
    """Multi-head attention core of Eq. 2 on projected inputs; returns (output, weights or None)."""
    q, k, v = (_split_heads(t, num_heads) for t in (query, key, value))  # (B, h, n, D/h)
    if need_weights:
        weights = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)  # (B, h, Lq, N)
        out = weights @ v
    else:  # fused kernel; identical math
        weights, out = None, F.scaled_dot_product_attention(q, k, v, scale=scale)
    batch, _, length, _ = out.shape
    return out.transpose(1, 2).reshape(batch, length, -1), weights  # (B, Lq, D)


class SelfAttentionBlock(nn.Module):
    """A transformer block (attention, W^o, ReLU feed-forward): the self-attention option of the paper block."""

    def __init__(self, dim: int, num_heads: int, layer_norm: bool, scale: float):
        super().__init__()
        self.num_heads, self.scale = num_heads, scale
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.feed_forward = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if layer_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n, dim) -> (B, n, dim)
        attended, _ = _attend(*self.qkv(x).chunk(3, dim=-1), self.num_heads, self.scale, False)
        x = self.norm1(x + self.out(attended))
        return self.norm2(x + F.relu(self.feed_forward(x)))


class AuthorsBlock(nn.Module):
    """The attention block of the authors' code (REFERENCE.md, "Where the authors' public code differs").

    O = fc_q(X_query) + MultiAtt(fc_q(X_query), fc_k(X_kv), fc_v(X_kv)): the residual is the
    projected query and there is no output projection W^o; then LayerNorm, O = O + ReLU(fc_o(O)),
    LayerNorm. Self-attention is the block with X_query = X_kv.
    """

    def __init__(self, query_dim: int, key_dim: int, width: int, num_heads: int, layer_norm: bool, scale: float):
        super().__init__()
        self.num_heads, self.scale = num_heads, scale
        self.fc_q = nn.Linear(query_dim, width)
        self.fc_k = nn.Linear(key_dim, width)
        self.fc_v = nn.Linear(key_dim, width)
        self.fc_o = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.norm2 = nn.LayerNorm(width) if layer_norm else nn.Identity()

    def forward(self, query: torch.Tensor, keys: torch.Tensor, need_weights: bool = False):
        """(B, n, query_dim), (B, N, key_dim) -> (B, n, width) and weights (B, h, n, N) or None."""
        projected = self.fc_q(query)  # (B, n, width)
        attended, weights = _attend(projected, self.fc_k(keys), self.fc_v(keys), self.num_heads, self.scale,
                                    need_weights)
        out = self.norm1(projected + attended)
        return self.norm2(out + F.relu(self.fc_o(out))), weights


def init_authors_weights(module: nn.Module) -> None:
    """Every Linear of `module`: weight normal(0, INIT_STD), bias 0 (the authors' init_weights)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, INIT_STD)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class LabelAttention(nn.Module):
    """Label-level embeddings g = MultiAttBlock(U, r, r) (Eq. 2, 3, 6).

    Args:
        in_dim: C, channels of the image tokens (and, in the paper's block, of the label queries U).
        num_labels: L.
        embed_dim: D, width of the label-level embeddings.
        num_heads: h.
        token_self_attention, label_self_attention, layer_norm, attention_scale: self-attention
            blocks over the tokens before and over the labels after, LayerNorm after each
            residual, and the softmax scaling; the same meaning in both blocks.
        attention_block: `paper` (Eq. 2, 3: U is L x C, normal; W^o; Q' + Q'W^{q'}) or `authors`
            (AuthorsBlock for every block; U is L x D, xavier-uniform as a (1, L, D) tensor; all
            Linear weights normal(0, 0.02), biases 0). The authors' exact module is `authors` with
            2 token blocks, 1 label block, layer_norm and attention_scale `full`.
    """

    def __init__(self, in_dim: int, num_labels: int, embed_dim: int, num_heads: int, *,
                 token_self_attention: int = 0, label_self_attention: int = 0,
                 layer_norm: bool = False, attention_scale: str = "none", attention_block: str = "paper"):
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"model.embed_dim {embed_dim} is not divisible by model.num_heads {num_heads}")
        if attention_block not in ATTENTION_BLOCKS:
            raise ConfigError(f"model.attention_block: {attention_block!r} is not one of {', '.join(ATTENTION_BLOCKS)}")
        self.num_heads, self.attention_block = num_heads, attention_block
        if attention_block == "authors":
            self._build_authors(in_dim, num_labels, embed_dim, num_heads, token_self_attention,
                                label_self_attention, layer_norm, attention_scale)
            return
        self.scale = _scale(attention_scale, embed_dim, num_heads)
        self.label_queries = nn.Parameter(torch.randn(num_labels, in_dim))  # U (L, C), normal init
        self.query = nn.Linear(in_dim, embed_dim)  # concat_h(W_h^q)
        self.key = nn.Linear(in_dim, embed_dim)
        self.value = nn.Linear(in_dim, embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)  # W^o
        self.refine = nn.Linear(embed_dim, embed_dim)  # W^{q'} of Eq. 3
        self.norm1 = nn.LayerNorm(embed_dim) if layer_norm else nn.Identity()
        self.norm2 = nn.LayerNorm(embed_dim) if layer_norm else nn.Identity()
        token_scale = _scale(attention_scale, in_dim, num_heads)
        self.token_blocks = nn.ModuleList(
            SelfAttentionBlock(in_dim, num_heads, layer_norm, token_scale) for _ in range(token_self_attention))
        self.label_blocks = nn.ModuleList(
            SelfAttentionBlock(embed_dim, num_heads, layer_norm, self.scale) for _ in range(label_self_attention))

    def _build_authors(self, in_dim: int, num_labels: int, embed_dim: int, num_heads: int, token_blocks: int,
                       label_blocks: int, layer_norm: bool, attention_scale: str) -> None:
        self.label_queries = nn.Parameter(torch.empty(num_labels, embed_dim))  # U (L, D)
        # xavier on the authors' (1, L, D) tensor: fan_in L*D, fan_out D (a view shares the storage)
        nn.init.xavier_uniform_(self.label_queries.data.view(1, num_labels, embed_dim))
        self.cross = AuthorsBlock(embed_dim, in_dim, embed_dim, num_heads, layer_norm,
                                  _scale(attention_scale, embed_dim, num_heads))
        token_scale, label_scale = _scale(attention_scale, in_dim, num_heads), _scale(attention_scale, embed_dim, num_heads)
        self.token_blocks = nn.ModuleList(
            AuthorsBlock(in_dim, in_dim, in_dim, num_heads, layer_norm, token_scale) for _ in range(token_blocks))
        self.label_blocks = nn.ModuleList(
            AuthorsBlock(embed_dim, embed_dim, embed_dim, num_heads, layer_norm, label_scale)
            for _ in range(label_blocks))
        init_authors_weights(self)

    def _forward_authors(self, tokens: torch.Tensor, need_weights: bool):
        for block in self.token_blocks:
            tokens, _ = block(tokens, tokens)  # (B, N, C)
        queries = self.label_queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, L, D)
        embeddings, weights = self.cross(queries, tokens, need_weights)  # (B, L, D)
        for block in self.label_blocks:
            embeddings, _ = block(embeddings, embeddings)
        return (embeddings, weights) if need_weights else embeddings

    def forward(self, tokens: torch.Tensor, need_weights: bool = False):
        """Map image tokens (B, N, C) to label embeddings (B, L, D); weights (B, h, L, N) if asked."""
        if self.attention_block == "authors":
            return self._forward_authors(tokens, need_weights)
        for block in self.token_blocks:
            tokens = block(tokens)
        batch = tokens.shape[0]
        query = self.query(self.label_queries).unsqueeze(0).expand(batch, -1, -1)  # (B, L, D)
        attended, weights = _attend(query, self.key(tokens), self.value(tokens),
                                    self.num_heads, self.scale, need_weights)
        queries = self.norm1(query + self.out(attended))  # Q' of Eq. 3
        embeddings = self.norm2(queries + self.refine(queries))  # g = Q' + Q'W^{q'}
        for block in self.label_blocks:
            embeddings = block(embeddings)
        return (embeddings, weights) if need_weights else embeddings


class Projector(nn.Module):
    """Proj(.): two linear layers with a ReLU between; outputs are L2-normalised (section 2.2)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_dim) -> (..., out_dim)
        return F.normalize(self.layers(x), dim=-1)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, L)
    projections: torch.Tensor | None  # (B, L, d_z) for MulCon, (B, d_z) for the Baseline; None if not asked
    label_embeddings: torch.Tensor | None = None  # (B, L, D), MulCon only
    attention: torch.Tensor | None = None  # (B, h, L, H*W) when asked, MulCon only


class MulCon(nn.Module):
    """The MulCon network of Figure 1."""

    def __init__(self, num_labels: int, backbone: str = "resnet101", pretrained: bool = True,
                 embed_dim: int = 1024, num_heads: int = 4, projection_dim: int = 128, weights_file: str = "",
                 **attention):
        super().__init__()
        self.backbone, channels = build_backbone(backbone, pretrained, weights_file)
        self.label_attention = LabelAttention(channels, num_labels, embed_dim, num_heads, **attention)
        # One Linear(D, 1) per label f_c^j, stored as one (L, D) weight so all run in one op.
        self.classifier_weight = nn.Parameter(torch.empty(num_labels, embed_dim))
        self.classifier_bias = nn.Parameter(torch.zeros(num_labels))
        self.projector = Projector(embed_dim, projection_dim)
        if self.label_attention.attention_block == "authors":
            nn.init.normal_(self.classifier_weight, 0.0, INIT_STD)
            init_authors_weights(self.projector)
        else:  # nn.Linear's default for each Linear(D, 1)
            nn.init.uniform_(self.classifier_weight, -1 / math.sqrt(embed_dim), 1 / math.sqrt(embed_dim))

    def forward(self, images: torch.Tensor, need_attention: bool = False,
                need_projections: bool = True) -> ModelOutput:
        """Logits (B, L); the projections (B, L, d_z) unless `need_projections` is False (a step
        without the contrastive loss: the projector runs on all L labels, a few percent of a step)."""
        features = self.backbone(images)  # (B, C, H', W')
        tokens = features.flatten(2).transpose(1, 2)  # (B, H'W', C)
        result = self.label_attention(tokens, need_weights=need_attention)
        embeddings, attention = result if need_attention else (result, None)  # (B, L, D)
        logits = (embeddings * self.classifier_weight).sum(-1) + self.classifier_bias  # (B, L)
        projections = self.projector(embeddings) if need_projections else None
        return ModelOutput(logits, projections, embeddings, attention)


class Baseline(nn.Module):
    """Backbone + global average pooling + linear classifier, with an image-level projector."""

    def __init__(self, num_labels: int, backbone: str = "resnet101", pretrained: bool = True,
                 projection_dim: int = 128, weights_file: str = ""):
        super().__init__()
        self.backbone, channels = build_backbone(backbone, pretrained, weights_file)
        self.classifier = nn.Linear(channels, num_labels)
        self.projector = Projector(channels, projection_dim)

    def forward(self, images: torch.Tensor, need_attention: bool = False,
                need_projections: bool = True) -> ModelOutput:
        pooled = self.backbone(images).mean(dim=(2, 3))  # (B, C)
        return ModelOutput(self.classifier(pooled), self.projector(pooled) if need_projections else None)


def build_model(config: ModelConfig, num_labels: int, label_level: bool, *,
                channels_last: bool = True) -> nn.Module:
    """MulCon when `label_level`, else the Baseline, from the model section of the config.

    With `channels_last` the convolution weights are stored NHWC, the layout of cuDNN's tensor-core
    kernels and of oneDNN on CPU (about 10% faster there, benchmarks/bench_train_step.py); the
    first convolution then produces NHWC features from NCHW images, so callers change nothing.
    Results differ only by float rounding.
    """
    if label_level:
        model = MulCon(num_labels, config.backbone, config.pretrained, config.embed_dim, config.num_heads,
                       config.projection_dim, weights_file=config.weights_file,
                       token_self_attention=config.token_self_attention,
                       label_self_attention=config.label_self_attention, layer_norm=config.layer_norm,
                       attention_scale=config.attention_scale, attention_block=config.attention_block)
    else:
        model = Baseline(num_labels, config.backbone, config.pretrained, config.projection_dim, config.weights_file)
    return model.to(memory_format=torch.channels_last) if channels_last else model
