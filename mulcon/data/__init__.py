"""Data: dataset readers (COCO-2014, NUS-WIDE, VOC-2007, labelled folders, synthetic demo), the prepare
stage, manifests, transforms.

The names below are loaded on first use (PEP 562), so importing one submodule (the training
loader, say) does not import the readers: a stage depends only on the files it runs.
"""

import importlib

_EXPORTS = {
    "DATASETS": "preparation", "prepare": "preparation", "ManifestDataset": "dataset",
    "eval_transform": "transforms", "train_transform": "transforms", "load_classes": "manifest",
    "read_manifest": "manifest", "make_demo": "demo", "read_coco": "coco", "read_coco_dataset": "coco",
    "read_nuswide": "nuswide", "read_voc": "voc", "read_folder": "folder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
