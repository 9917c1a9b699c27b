"""Data: dataset readers (COCO-2014, NUS-WIDE, synthetic demo), the prepare stage, manifests, transforms."""

from mulcon.data.coco import read_coco, read_coco_dataset
from mulcon.data.dataset import ManifestDataset, load_classes, read_manifest
from mulcon.data.demo import make_demo
from mulcon.data.nuswide import read_nuswide
from mulcon.data.prepare import DATASETS, prepare
from mulcon.data.transforms import eval_transform, train_transform

__all__ = [
    "DATASETS", "ManifestDataset", "eval_transform", "load_classes", "make_demo", "prepare",
    "read_coco", "read_coco_dataset", "read_manifest", "read_nuswide", "train_transform",
]
