"""Losses of MulCon (paper section 2.3): BCE (Eq. 7), the label-level contrastive loss (Eq. 8),
the image-level supervised contrastive loss of the "Backbone with BCE + SCL" ablation, and the
asymmetric loss of Ben-Baruch et al. as an optional classification loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _supervised_contrastive(embeddings: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon over M instances (Eq. 5/8): mean over anchors with a positive of -mean_p log softmax_A.

    Args:
        embeddings: (M, d) float; L2-normalised here, in at least fp32 (autocast may hand in bf16).
        positives: (M, M) bool, positives[i, k] = k is a positive of anchor i; the diagonal is ignored.
        temperature: tau.
    Returns:
        Scalar. Anchors without a positive are left out of the mean; when no anchor has one the
        result is 0 and still part of the graph (so backward() works on any batch).
    """
    embeddings = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=-1)
    count = embeddings.shape[0]
    self_mask = torch.eye(count, dtype=torch.bool, device=embeddings.device)
    logits = embeddings @ embeddings.T / temperature  # (M, M)
    logits = logits.masked_fill(self_mask, float("-inf"))  # A(i) excludes the anchor itself
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = positives & ~self_mask
    num_positives = positives.sum(1)  # (M,)
    has_positive = num_positives > 0
    if not bool(has_positive.any()):
        return embeddings.sum() * 0.0
    # -inf only sits on the diagonal, which is never a positive: zero it before the weighted sum.
    positive_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)  # (M,)
    per_anchor = -positive_log_prob[has_positive] / num_positives[has_positive]
    return per_anchor.mean()


def label_contrastive_loss(projections: torch.Tensor, targets: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """L_con of Eq. 8 over the label-level projections of a batch.

    Anchors are the active (image, label) pairs of the batch; the denominator of each anchor runs
    over all other active pairs, whatever their label; its positives are the same label in other
    rows (with two augmented views as rows, the other view of the same image is always one).

    Args:
        projections: (B, L, d) float, the z_ij; L2-normalised here.
        targets: (B, L) in {0, 1}.
        temperature: tau > 0.
    Returns:
        Scalar: mean over anchors with at least one positive (the paper's sum over anchors divided
        by their number, which only rescales gamma); 0 with a usable graph when there is none.
    """
    if projections.dim() != 3 or targets.shape != projections.shape[:2]:
        raise ValueError(f"expected projections (B, L, d) and targets (B, L), got "
                         f"{tuple(projections.shape)} and {tuple(targets.shape)}")
    active = targets.reshape(-1) > 0.5  # (B*L,)
    labels = torch.arange(targets.shape[1], device=targets.device).repeat(targets.shape[0])
    embeddings = projections.reshape(-1, projections.shape[-1])[active]  # (M, d)
    labels = labels[active]  # (M,)
    # Pairs (i, j) are unique, so "same label, not itself" is "same label in another row".
    positives = labels[:, None] == labels[None, :]
    return _supervised_contrastive(embeddings, positives, temperature)


def image_contrastive_loss(projections: torch.Tensor, targets: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Image-level SupCon (the "Backbone with BCE + SCL" ablation): each row is an anchor and its
    positives are the other rows that share at least one active label.

    Args:
        projections: (B, d) float; L2-normalised here.
        targets: (B, L) in {0, 1}.
        temperature: tau > 0.
    Returns:
        Scalar, averaged like label_contrastive_loss.
    """
    if projections.dim() != 2 or targets.dim() != 2 or targets.shape[0] != projections.shape[0]:
        raise ValueError(f"expected projections (B, d) and targets (B, L), got "
                         f"{tuple(projections.shape)} and {tuple(targets.shape)}")
    binary = (targets > 0.5).float()
    positives = (binary @ binary.T) > 0  # share at least one active label
    return _supervised_contrastive(projections, positives, temperature)


BCE_REDUCTIONS = ("sum", "mean")


def _reduce(per_label: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, L) per-label losses -> scalar: `sum` over labels then mean over images (Eq. 7), or
    `mean` over all B x L entries (PyTorch's default, the authors' code): Eq. 7 divided by L."""
    if reduction == "sum":
        return per_label.sum(1).mean()
    if reduction == "mean":
        return per_label.mean()
    raise ValueError(f"reduction: {reduction!r} is not one of {', '.join(BCE_REDUCTIONS)}")


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Binary cross-entropy of the L labels of each image (Eq. 7).

    Args:
        logits: (B, L) float scores s_ij (computed in fp32 here).
        targets: (B, L) in {0, 1}, or -1 for an ignored pair (VOC's difficult-only objects), which
            adds nothing: neither positive nor negative.
        reduction: `sum` (Eq. 7: summed over labels, averaged over images) or `mean` (averaged
            over all B x L entries, as in the authors' code; the same loss divided by L). Under SGD
            the reduction scales every gradient step, so learning rates come with a reduction.
    Returns:
        Scalar.
    """
    kept = (targets >= 0).float()
    per_label = F.binary_cross_entropy_with_logits(logits.float(), targets.float().clamp(min=0), reduction="none")
    return _reduce(per_label * kept, reduction)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_pos: float = 0.0,
                    gamma_neg: float = 4.0, clip: float = 0.05, eps: float = 1e-8,
                    reduction: str = "sum") -> torch.Tensor:
    """Asymmetric loss (Ben-Baruch et al., 2020), reduced like bce_loss (same `reduction`).

    Negatives get a probability margin `clip` and a focusing exponent `gamma_neg`; positives
    `gamma_pos`. With all three at 0 this is bce_loss. Targets of -1 (ignored) add nothing.
    """
    kept = (targets >= 0).float()
    targets = targets.float().clamp(min=0)
    probability = torch.sigmoid(logits.float())
    negative_probability = 1 - probability
    if clip > 0:
        negative_probability = (negative_probability + clip).clamp(max=1)
    loss = targets * torch.log(probability.clamp(min=eps)) + (1 - targets) * torch.log(negative_probability.clamp(min=eps))
    if gamma_pos > 0 or gamma_neg > 0:
        chosen = probability * targets + negative_probability * (1 - targets)
        exponent = gamma_pos * targets + gamma_neg * (1 - targets)
        loss = loss * torch.pow(1 - chosen, exponent)
    return _reduce(-(loss * kept), reduction)
