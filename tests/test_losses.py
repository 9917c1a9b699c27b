"""Losses against plain per-anchor loops written straight from Eq. 8 and SupCon (Eq. 5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mulcon.losses import asymmetric_loss, bce_loss, image_contrastive_loss, label_contrastive_loss


def reference_label_loss(projections, targets, temperature):
    """Eq. 8 with Python loops: anchors are active (i, j); A = other active pairs; P = label j elsewhere."""
    z = F.normalize(projections.double(), dim=-1)
    active = [(i, j) for i in range(targets.shape[0]) for j in range(targets.shape[1]) if targets[i, j] == 1]
    losses = []
    for i, j in active:
        others = [(k, l) for k, l in active if (k, l) != (i, j)]
        positives = [(k, l) for k, l in others if l == j]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i, j] @ z[k, l]) / temperature) for k, l in others)
        terms = [math.log(math.exp(float(z[i, j] @ z[k, l]) / temperature) / denominator) for k, l in positives]
        losses.append(-sum(terms) / len(terms))
    return sum(losses) / len(losses) if losses else 0.0


def reference_image_loss(projections, targets, temperature):
    z = F.normalize(projections.double(), dim=-1)
    rows = range(targets.shape[0])
    losses = []
    for i in rows:
        others = [k for k in rows if k != i]
        positives = [k for k in others if float(targets[i] @ targets[k]) > 0]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in others)
        losses.append(-sum(math.log(math.exp(float(z[i] @ z[k]) / temperature) / denominator) for k in positives) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_label_contrastive_matches_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    projections = torch.randn(6, 5, 8, generator=generator)
    targets = (torch.rand(6, 5, generator=generator) < 0.4).float()
    expected = reference_label_loss(projections, targets, 0.2)
    assert float(label_contrastive_loss(projections, targets, 0.2)) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_image_contrastive_matches_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    projections = torch.randn(7, 8, generator=generator)
    targets = (torch.rand(7, 5, generator=generator) < 0.3).float()
    expected = reference_image_loss(projections, targets, 0.5)
    assert float(image_contrastive_loss(projections, targets, 0.5)) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_two_views_make_the_other_view_a_positive():
    # One image with one label, two views as two rows: each view's only other pair is its positive.
    projections = torch.randn(2, 3, 4)
    targets = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    loss = label_contrastive_loss(projections, targets, 0.2)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)  # log softmax over a single candidate is 0
    targets = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert float(label_contrastive_loss(projections, targets, 0.2)) > 0


def test_no_positive_gives_zero_with_a_graph():
    projections = torch.randn(3, 4, 8, requires_grad=True)
    targets = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]])
    loss = label_contrastive_loss(projections, targets, 0.2)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert projections.grad is not None and torch.all(projections.grad == 0)
    empty = label_contrastive_loss(projections, torch.zeros(3, 4), 0.2)
    empty.backward()


def test_gradients_are_finite_and_match_double_precision():
    generator = torch.Generator().manual_seed(0)
    projections = torch.randn(4, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(4, 4, generator=generator) < 0.6).double()
    assert torch.autograd.gradcheck(lambda p: label_contrastive_loss(p, targets, 0.2), (projections,))


def test_invariant_to_row_order():
    generator = torch.Generator().manual_seed(3)
    projections = torch.randn(10, 6, 8, generator=generator)
    targets = (torch.rand(10, 6, generator=generator) < 0.4).float()
    order = torch.randperm(10, generator=generator)
    assert torch.allclose(label_contrastive_loss(projections, targets), label_contrastive_loss(projections[order], targets[order]))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"expected projections \(B, L, d\) and targets \(B, L\)"):
        label_contrastive_loss(torch.randn(4, 8), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"expected projections \(B, d\)"):
        image_contrastive_loss(torch.randn(4, 3, 8), torch.zeros(4, 3))


def test_bce_is_eq7_summed_over_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.sigmoid(logits)
    by_hand = -(torch.log(s[0, 0]) + torch.log(1 - s[0, 1]) + torch.log(1 - s[1, 0]) + torch.log(s[1, 1])) / 2
    assert float(bce_loss(logits, targets)) == pytest.approx(float(by_hand), rel=1e-6)


def test_asymmetric_loss_reduces_to_bce_and_down_weights_easy_negatives():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=generator)
    targets = (torch.rand(5, 7, generator=generator) < 0.3).float()
    plain = asymmetric_loss(logits, targets, gamma_pos=0, gamma_neg=0, clip=0)
    assert float(plain) == pytest.approx(float(bce_loss(logits, targets)), rel=1e-5)
    assert float(asymmetric_loss(logits, targets)) < float(plain)


def test_bce_reduction_sum_is_eq7_and_mean_averages_all_entries():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, generator=generator)
    targets = (torch.rand(4, 3, generator=generator) < 0.5).float()
    p = torch.sigmoid(logits)
    entries = [-(float(targets[i, j]) * math.log(p[i, j]) + (1 - float(targets[i, j])) * math.log(1 - p[i, j]))
               for i in range(4) for j in range(3)]
    per_image = [sum(entries[3 * i:3 * i + 3]) for i in range(4)]
    assert float(bce_loss(logits, targets, reduction="sum")) == pytest.approx(sum(per_image) / 4, rel=1e-6)
    assert float(bce_loss(logits, targets, reduction="mean")) == pytest.approx(sum(entries) / 12, rel=1e-6)
    assert float(bce_loss(logits, targets)) == float(bce_loss(logits, targets, reduction="sum"))  # Eq. 7 default
    assert float(bce_loss(logits, targets, reduction="mean")) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, targets)), rel=1e-6)  # PyTorch's default


def test_asymmetric_loss_follows_the_reduction():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 8, generator=generator)
    targets = (torch.rand(5, 8, generator=generator) < 0.3).float()
    summed, mean = asymmetric_loss(logits, targets), asymmetric_loss(logits, targets, reduction="mean")
    assert float(mean) == pytest.approx(float(summed) / 8, rel=1e-6)  # the sum over labels divided by L
    with pytest.raises(ValueError, match=r"reduction: 'max' is not one of sum, mean"):
        bce_loss(logits, targets, reduction="max")


def test_ignored_targets_add_nothing_to_bce_and_asl():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1, 0, -1, 0, 1], [0, -1, 1, 0, 0], [1, 1, 0, -1, 0], [0, 0, 0, 0, 1]]).float()
    kept = targets >= 0
    per_label = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.clamp(min=0), reduction="none")
    assert bce_loss(logits, targets) == pytest.approx(float((per_label * kept).sum(1).mean()), rel=1e-6)
    # Moving an ignored logit changes nothing, for BCE and for ASL.
    moved = torch.where(kept, logits, logits + 5.0)
    assert bce_loss(moved, targets) == pytest.approx(float(bce_loss(logits, targets)), rel=1e-6)
    assert asymmetric_loss(moved, targets) == pytest.approx(float(asymmetric_loss(logits, targets)), rel=1e-6)
