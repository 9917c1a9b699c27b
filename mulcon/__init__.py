"""MulCon: multi-label image classification with label-level attention embeddings and a
label-level contrastive loss (Dao et al., "Contrast Learning Visual Attention for Multi Label
Classification"). See README.md for the layout of the package.
"""

__version__ = "0.1.0"
