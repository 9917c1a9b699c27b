"""The authors' attention block (model.attention_block=authors) against REFERENCE.md's equations,
written here with explicit tensor algebra on the module's own weight tensors (no call of our
modules): per block, O = fc_q(X_query) + concat_h softmax(Q_h K_h^T / sqrt(W)) V_h, LayerNorm,
O = O + ReLU(fc_o(O)), LayerNorm; two token self-attention blocks, the cross-attention of the
label queries (L x D) on the tokens, one label self-attention block. float64, to 1e-6."""

import math

import pytest
import torch

from mulcon.config import load_config
from mulcon.model import LabelAttention, MulCon, build_model
from tests.conftest import ROOT

HEADS = 4
AUTHORS = {"attention_block": "authors", "token_self_attention": 2, "label_self_attention": 1,
           "layer_norm": True, "attention_scale": "full"}


def linear(x, prefix, weights):
    return torch.matmul(x, weights[f"{prefix}.weight"].T) + weights[f"{prefix}.bias"]


def layer_norm(x, prefix, weights, eps=1e-5):
    centred = x - x.mean(-1, keepdim=True)
    variance = (centred ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return centred / torch.sqrt(variance + eps) * weights[f"{prefix}.weight"] + weights[f"{prefix}.bias"]


def reference_block(x_query, x_kv, prefix, weights):
    """REFERENCE.md's block on (B, n, .) and (B, N, .), from the weights named `prefix.*`."""
    q = linear(x_query, f"{prefix}.fc_q", weights)  # (B, n, W)
    k = linear(x_kv, f"{prefix}.fc_k", weights)
    v = linear(x_kv, f"{prefix}.fc_v", weights)
    width = q.shape[-1]
    size = width // HEADS
    heads = []
    for h in range(HEADS):
        part = slice(h * size, (h + 1) * size)
        scores = torch.matmul(q[..., part], k[..., part].transpose(-1, -2)) / math.sqrt(width)  # full width
        heads.append(torch.matmul(torch.softmax(scores, dim=-1), v[..., part]))
    out = layer_norm(q + torch.cat(heads, dim=-1), f"{prefix}.norm1", weights)  # projected-query residual
    out = out + torch.relu(linear(out, f"{prefix}.fc_o", weights))
    return layer_norm(out, f"{prefix}.norm2", weights)


def randomised(module):
    """Random values in every parameter (biases and LayerNorm affines too), so each one counts."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)
    return module


@pytest.fixture
def attention():
    torch.manual_seed(0)
    return randomised(LabelAttention(16, 5, 24, HEADS, **AUTHORS).double().eval())


def test_token_self_attention_blocks_match_the_equations(attention):
    weights = dict(attention.named_parameters())
    tokens = torch.randn(3, 9, 16, dtype=torch.float64)
    for index, block in enumerate(attention.token_blocks):
        expected = reference_block(tokens, tokens, f"token_blocks.{index}", weights)
        ours, _ = block(tokens, tokens)
        assert torch.allclose(ours, expected, atol=1e-6, rtol=0)
        tokens = expected


def test_cross_attention_block_matches_the_equations(attention):
    weights = dict(attention.named_parameters())
    tokens = torch.randn(3, 9, 16, dtype=torch.float64)
    queries = weights["label_queries"].expand(3, -1, -1)  # (B, L, D)
    expected = reference_block(queries, tokens, "cross", weights)
    ours, attended = attention.cross(queries, tokens, need_weights=True)
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0)
    fused, _ = attention.cross(queries, tokens)  # the SDPA path computes the same
    assert torch.allclose(fused, expected, atol=1e-6, rtol=0)
    assert attended.shape == (3, HEADS, 5, 9)


def test_label_self_attention_block_and_whole_module_match_the_equations(attention):
    weights = dict(attention.named_parameters())
    tokens = torch.randn(3, 9, 16, dtype=torch.float64)
    embeddings = torch.randn(3, 5, 24, dtype=torch.float64)
    ours, _ = attention.label_blocks[0](embeddings, embeddings)
    assert torch.allclose(ours, reference_block(embeddings, embeddings, "label_blocks.0", weights), atol=1e-6, rtol=0)
    x = reference_block(tokens, tokens, "token_blocks.0", weights)
    x = reference_block(x, x, "token_blocks.1", weights)
    g = reference_block(weights["label_queries"].expand(3, -1, -1), x, "cross", weights)
    g = reference_block(g, g, "label_blocks.0", weights)
    assert torch.allclose(attention(tokens), g, atol=1e-6, rtol=0)


def test_authors_initialisation():
    torch.manual_seed(0)
    model = MulCon(80, backbone="resnet18", pretrained=False, embed_dim=256, num_heads=HEADS,
                   projection_dim=128, **AUTHORS)
    queries = model.label_attention.label_queries
    assert queries.shape == (80, 256)  # L x D, not L x C
    bound = math.sqrt(6.0 / (80 * 256 + 256))  # xavier-uniform of a (1, L, D) tensor
    assert float(queries.detach().abs().max()) <= bound and float(queries.detach().abs().max()) > 0.9 * bound
    linears = [name for name, layer in model.named_modules() if isinstance(layer, torch.nn.Linear)]
    assert any(name.startswith("label_attention.token_blocks.") for name in linears)
    assert any(name.startswith("projector.") for name in linears)
    for name in linears:
        layer = model.get_submodule(name)
        assert float(layer.weight.std()) == pytest.approx(0.02, rel=0.1), name
        assert torch.count_nonzero(layer.bias) == 0, name
    assert float(model.classifier_weight.std()) == pytest.approx(0.02, rel=0.1)
    assert not any(name.endswith(".out") for name in linears)  # no W^o


def test_authors_preset_builds_the_authors_module():
    config = load_config(ROOT / "configs" / "authors-coco2014.yaml", ["model.pretrained=false"])
    model = build_model(config.model, 80, label_level=True, channels_last=False)
    attention = model.label_attention
    assert attention.attention_block == "authors"
    assert len(attention.token_blocks) == 2 and len(attention.label_blocks) == 1
    assert attention.cross.scale == pytest.approx(1 / math.sqrt(1024))
    assert attention.token_blocks[0].scale == pytest.approx(1 / math.sqrt(2048))
    assert isinstance(attention.cross.norm1, torch.nn.LayerNorm)
