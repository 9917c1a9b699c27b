"""Augmentation on the training device (`data.augment_device: cuda`), run here on CPU tensors: the
batched path gives exactly the per-sample path's images, which give exactly torchvision's own
RandomHorizontalFlip + RandAugment on the same tensor under the same seed; a training run with the
key trains, and resumes to the weights of an uninterrupted run; the optimizers use multi-tensor kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import mulcon.train
from mulcon import checkpoint
from mulcon.config import load_config
from mulcon.data import gpu_augment
from mulcon.data.gpu_augment import (OPS, SIGNED, AugmentedView, SampledAugmentation, augment_batch,
                                     augment_sample, normalise, sample_parameters, to_device)
from mulcon.data.sampling import SeededDataset
from mulcon.data.transforms import ToNormalisedTensor
from mulcon.errors import ConfigError
from mulcon.optim import build_optimizer
from mulcon.train import run_training
from mulcon.variants import Step

SIZE = 24


def _images(count: int, seed: int = 0) -> torch.Tensor:
    """uint8 (count, 3, SIZE, SIZE) with structure (gradients, a square) as well as noise."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, SIZE).view(1, 1, SIZE)
    images = ramp + torch.randint(0, 56, (count, 3, SIZE, SIZE), generator=generator)
    images[:, :, 6:14, 8:18] = torch.randint(0, 256, (count, 3, 1, 1), generator=generator).float()
    return images.to(torch.uint8)


def _every_operation() -> torch.Tensor:
    """Params covering every (operation, sign) at both steps, with and without the flip, and
    several views per group (so groups really are applied together)."""
    keys = [(op, negative) for op, name in enumerate(OPS) for negative in ((0, 1) if name in SIGNED else (0,))]
    rows = []
    for index, (op, negative) in enumerate(keys * 2):
        second_op, second_negative = keys[(5 * index + 3) % len(keys)]
        rows.append([index % 2, op, negative, second_op, second_negative])
    return torch.tensor(rows)


def test_the_batch_path_gives_exactly_the_per_sample_images_for_every_operation():
    params = _every_operation()
    images = _images(len(params))
    reference = torch.stack([augment_sample(image, row) for image, row in zip(images, params)])
    batched = augment_batch(images, params)
    assert batched.dtype == torch.uint8 and batched.shape == images.shape
    assert torch.equal(batched, reference)
    assert not torch.equal(batched, images)  # and the operations did change the images
    assert torch.equal(images, _images(len(params)))  # the input batch is left as it was


def test_the_per_sample_path_is_torchvisions_flip_and_randaugment_under_the_same_seed():
    torchvision_pipeline = v2.Compose([v2.RandomHorizontalFlip(), v2.RandAugment()])
    images, seen = _images(8, seed=3), set()
    for seed in range(60):
        image = images[seed % len(images)]
        torch.manual_seed(seed)
        expected = torchvision_pipeline(image)
        torch.manual_seed(seed)
        params = sample_parameters()
        seen.update(int(op) for op in params[1::2])
        assert torch.equal(augment_sample(image, params), expected), (seed, params.tolist())
    assert seen == set(range(len(OPS)))  # every operation was drawn


def test_without_randaugment_only_the_flip_is_sampled():
    torch.manual_seed(0)
    params = torch.stack([sample_parameters(randaugment=False) for _ in range(20)])
    assert params[:, 1:].eq(0).all() and 0 < params[:, 0].sum() < 20


def test_normalise_has_the_arithmetic_of_the_cpu_transform():
    image = Image.fromarray(np.asarray(_images(1)[0].permute(1, 2, 0)))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    assert torch.equal(normalise(pixels[None])[0], ToNormalisedTensor()(image))


def test_sampled_views_are_functions_of_seed_epoch_and_index():
    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return SampledAugmentation(SIZE)(Image.fromarray(np.asarray(_images(4)[index].permute(1, 2, 0))))

    dataset = SeededDataset(Images(), seed=7)
    first, again, other_epoch = dataset[(0, 2)], dataset[(0, 2)], dataset[(1, 2)]
    assert isinstance(first, AugmentedView) and first.pixels.dtype == torch.uint8
    assert torch.equal(first.pixels, again.pixels) and torch.equal(first.params, again.params)
    assert torch.equal(first.pixels, other_epoch.pixels)  # the same pixels, other parameters
    assert not all(torch.equal(dataset[(0, index)].params, dataset[(1, index)].params) for index in range(4))


def test_to_device_augments_each_view_of_a_collated_batch():
    params = _every_operation()[:6]
    images = _images(6)
    batch = torch.utils.data.default_collate([(AugmentedView(image, row), AugmentedView(image, row.flip(0)))
                                              for image, row in zip(images, params)])
    views = to_device(batch, torch.device("cpu"))
    assert isinstance(views, list) and len(views) == 2
    assert torch.equal(views[0], normalise(augment_batch(images, params)))
    assert views[0].dtype == torch.float32 and views[0].shape == (6, 3, SIZE, SIZE)


def test_prefetch_off_cuda_loads_each_batch_in_order():
    loaded = list(gpu_augment.prefetch(range(4), lambda batch: batch * 10, torch.device("cpu")))
    assert loaded == [0, 10, 20, 30]


def test_optimizers_use_the_multi_tensor_kernels_on_cpu(tiny_params):
    config = load_config(tiny_params)
    model = torch.nn.Linear(3, 2)
    for stage in ("pretrain", "finetune"):
        group = build_optimizer(config, stage, model).param_groups[0]
        assert group["foreach"] is True and not group.get("fused")


def test_augment_device_cuda_trains_on_the_cpu_and_resumes_to_the_same_weights(tiny_params, tmp_path):
    # Step 2 alone (two views, L_con), two epochs, no validation: the cheapest run that resumes.
    overrides = ["train.variant=mulcon_no_pretrain", "train.finetune_epochs=2", "data.val_fraction=0",
                 "data.augment_device=cuda"]
    config = load_config(tiny_params, overrides)
    batch = next(iter(mulcon.train.train_loader(config, Step("finetune", 1, "label"))))
    assert all(isinstance(view, AugmentedView) and view.pixels.dtype == torch.uint8 for view in batch[0])
    whole = checkpoint.load(run_training(config))["model"]

    def stop_after_the_first_epoch(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt  # after the epoch's checkpoint was written, like a kill

    interrupted = load_config(tiny_params, [*overrides, f"train.out_root={tmp_path / 'again'}",
                                            f"train.checkpoint_root={tmp_path / 'again-checkpoints'}"])
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted, callback=stop_after_the_first_epoch)
    resumed = checkpoint.load(run_training(interrupted, resume=True))["model"]
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


@pytest.mark.parametrize("override, message", [
    ("data.augment_device=gpu", "data.augment_device: 'gpu' is not one of cpu, cuda"),
    ("train.compile_mode=fast", "train.compile_mode: 'fast' is not one of default, reduce-overhead, max-autotune, "
                                "max-autotune-no-cudagraphs"),
])
def test_unknown_augment_device_or_compile_mode_is_refused_by_name(tiny_params, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_params, [override])
