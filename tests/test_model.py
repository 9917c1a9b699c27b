"""LabelAttention properties (token-order invariance, batch independence), shapes, and the real
torchvision weight-loading path, fed from a local cache file the test writes."""

import pytest
import torch
import torchvision

from mulcon.config import load_config
from mulcon.errors import ConfigError
from mulcon.model import Baseline, LabelAttention, MulCon, build_model
from tests.conftest import ROOT

VARIANTS = [
    {},
    {"attention_scale": "full", "layer_norm": True},
    {"token_self_attention": 2, "label_self_attention": 1, "layer_norm": True, "attention_scale": "head"},
    {"attention_block": "authors"},
    {"attention_block": "authors", "token_self_attention": 2, "label_self_attention": 1, "layer_norm": True,
     "attention_scale": "full"},
]


@pytest.mark.parametrize("options", VARIANTS)
def test_label_attention_is_invariant_to_token_order(options):
    torch.manual_seed(0)
    attention = LabelAttention(16, 5, 32, 4, **options).double().eval()
    tokens = torch.randn(3, 9, 16, dtype=torch.float64)
    # With the token self-attention option the blocks are permutation-equivariant, so the
    # label queries' pooled output stays invariant.
    shuffled = tokens[:, torch.randperm(9)]
    assert torch.allclose(attention(tokens), attention(shuffled), atol=1e-10)


@pytest.mark.parametrize("options", VARIANTS)
def test_label_attention_output_of_an_image_ignores_its_batch(options):
    torch.manual_seed(1)
    attention = LabelAttention(16, 5, 32, 4, **options).double().eval()
    tokens = torch.randn(4, 9, 16, dtype=torch.float64)
    together = attention(tokens)
    alone = torch.cat([attention(tokens[i:i + 1]) for i in range(4)])
    assert together.shape == (4, 5, 32)
    assert torch.allclose(together, alone, atol=1e-10)


def test_attention_weights_and_fused_path_agree():
    torch.manual_seed(2)
    attention = LabelAttention(16, 5, 32, 4).double()
    tokens = torch.randn(2, 7, 16, dtype=torch.float64)
    embeddings, weights = attention(tokens, need_weights=True)
    assert weights.shape == (2, 4, 5, 7)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 5, dtype=torch.float64))
    assert torch.allclose(embeddings, attention(tokens), atol=1e-10)  # explicit softmax == SDPA


def test_label_attention_implements_eq3_by_hand():
    torch.manual_seed(3)
    attention = LabelAttention(6, 3, 8, 2).double()
    tokens = torch.randn(1, 5, 6, dtype=torch.float64)
    q = attention.query(attention.label_queries)  # (L, D) = concat_h(U W_h^q)
    k, v = attention.key(tokens[0]), attention.value(tokens[0])
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        heads.append(torch.softmax(q[:, part] @ k[:, part].T, dim=-1) @ v[:, part])  # Eq. 1, unscaled
    q_prime = q + attention.out(torch.cat(heads, dim=-1))  # Eq. 3
    expected = q_prime + attention.refine(q_prime)
    assert torch.allclose(attention(tokens)[0], expected, atol=1e-10)
    assert attention.label_queries.shape == (3, 6)


def test_mulcon_and_baseline_outputs():
    torch.manual_seed(0)
    model = MulCon(7, backbone="resnet18", pretrained=False, embed_dim=32, num_heads=4, projection_dim=16).eval()
    output = model(torch.randn(2, 3, 64, 64), need_attention=True)
    assert output.logits.shape == (2, 7)
    assert output.label_embeddings.shape == (2, 7, 32)
    assert output.projections.shape == (2, 7, 16)
    assert output.attention.shape == (2, 4, 7, 4)  # 64 px / 32 = 2 x 2 tokens
    assert torch.allclose(output.projections.norm(dim=-1), torch.ones(2, 7), atol=1e-5)
    # One Linear(D, 1) per label: logit j depends on embedding j only.
    expected = (output.label_embeddings[:, 3] @ model.classifier_weight[3]) + model.classifier_bias[3]
    assert torch.allclose(output.logits[:, 3], expected, atol=1e-5)
    baseline = Baseline(7, backbone="resnet18", pretrained=False, projection_dim=16).eval()
    output = baseline(torch.randn(2, 3, 64, 64))
    assert output.logits.shape == (2, 7) and output.projections.shape == (2, 16)


def test_mulcon_prediction_of_an_image_ignores_its_batch():
    torch.manual_seed(0)
    model = MulCon(5, backbone="resnet18", pretrained=False, embed_dim=16, num_heads=2).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        together = model(images).logits
        alone = torch.cat([model(images[i:i + 1]).logits for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-4)


def test_pretrained_weights_come_through_torchvision_loader(tmp_path, monkeypatch):
    # No network here: put a known state dict where torchvision's loader looks, under the file
    # name of the real ImageNet weights, and check that MulCon(pretrained=True) carries it.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(5)
    reference = torchvision.models.resnet18()
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    model = MulCon(4, backbone="resnet18", pretrained=True, embed_dim=16, num_heads=2)
    assert torch.equal(model.backbone[0].weight, reference.conv1.weight)
    assert torch.equal(model.backbone[7][1].conv2.weight, reference.layer4[1].conv2.weight)


def test_missing_pretrained_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(ConfigError, match=r"cannot load ImageNet weights for resnet18.*resnet18-.*\.pth in .*checkpoints"):
        MulCon(4, backbone="resnet18", pretrained=True, embed_dim=16, num_heads=2)


def test_unknown_backbone_and_bad_heads():
    with pytest.raises(ConfigError, match="model.backbone: 'vgg16' is not one of resnet18, resnet50, resnet101"):
        MulCon(4, backbone="vgg16", pretrained=False)
    with pytest.raises(ConfigError, match="not divisible"):
        LabelAttention(8, 3, 30, 4)


def test_build_model_from_params():
    config = load_config(ROOT / "params.yaml", ["model.embed_dim=32"])
    assert isinstance(build_model(config.model, 6, label_level=True), MulCon)
    assert isinstance(build_model(config.model, 6, label_level=False), Baseline)
