"""Training augmentations.

``weak_augment`` (batched tensor ops, no per-image Python loops over pixels) is the shared
augmentation: flips, 90-degree rotations, brightness and contrast, the same for every row, so
methods that use it see identical data. ``strong_augment`` is the photometric perturbation used
by methods that need two views of unlabeled images.

``WeakStrongAugment`` is the official KnowSAM dataloader's (taozh2017/KnowSAM
``dataloader/transforms.py`` 31-62, chosen per row in ``dataloader/dataset.py`` 139-147):
labeled images get a weak pipeline, unlabeled images a strong one, both with albumentations.
"""

from __future__ import annotations

import numpy as np
import torch

from knowsam.data.geometry import ViewGeometry, identity_map, warp_from_albumentations


def _per_image(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=gen)


def weak_augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, jitter: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random h/v flip, k*90 rotation and brightness/contrast jitter, per image, labels moved alike."""
    x, y, _ = weak_augment_with_geometry(x, y, gen, jitter)
    return x, y


def weak_augment_with_geometry(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, jitter: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, ViewGeometry]:
    """``weak_augment`` and the flips and rotation it drew for each row."""
    n = len(x)
    if n == 0:
        return x, y, ViewGeometry.identity(0)
    hflip = _per_image(gen, n) < 0.5
    vflip = _per_image(gen, n) < 0.5
    rot = torch.randint(0, 4, (n,), generator=gen)
    brightness = (torch.rand(n, generator=gen) * 2 - 1) * jitter
    contrast = 1 + (torch.rand(n, generator=gen) * 2 - 1) * jitter
    x = torch.where(hflip[:, None, None, None], x.flip(-1), x)
    y = torch.where(hflip[:, None, None], y.flip(-1), y)
    x = torch.where(vflip[:, None, None, None], x.flip(-2), x)
    y = torch.where(vflip[:, None, None], y.flip(-2), y)
    if x.shape[-1] == x.shape[-2]:  # square inputs only: rotations keep the shape
        xs, ys = [x], [y]
        for k in (1, 2, 3):
            xs.append(torch.rot90(x, k, (-2, -1)))
            ys.append(torch.rot90(y, k, (-2, -1)))
        x = torch.stack(xs)[rot, torch.arange(n)]
        y = torch.stack(ys)[rot, torch.arange(n)]
    else:
        rot = torch.zeros_like(rot)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast[:, None, None, None] + mean + brightness[:, None, None, None]).clamp(0, 1)
    return x.contiguous(), y.contiguous(), ViewGeometry(hflip, vflip, rot)


def strong_augment(x: torch.Tensor, gen: torch.Generator, strength: float = 0.3, noise: float = 0.05) -> torch.Tensor:
    """Photometric perturbation per image: brightness, contrast, gamma and Gaussian noise."""
    n = len(x)
    if n == 0:
        return x
    u = lambda: torch.rand(n, 1, 1, 1, generator=gen, device="cpu").to(x.device) * 2 - 1  # noqa: E731
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    out = (x - mean) * (1 + strength * u()) + mean + strength * 0.5 * u()
    gamma = torch.exp(strength * u())
    out = out.clamp(1e-6, 1) ** gamma
    out = out + noise * torch.randn(x.shape, generator=gen).to(x.device)
    return out.clamp(0, 1)


# The official pipelines were written for albumentations 1.3, whose geometric transforms reflect
# at the border by default (version 2 fills with 0): the border mode is set explicitly.
_REFLECT = 4  # cv2.BORDER_REFLECT_101


def _shift_scale_rotate():
    """The official ``ShiftScaleRotate(0.0625, 0.05, 10)`` as albumentations 2 writes it."""
    import albumentations as A

    return A.Affine(
        translate_percent=(-0.0625, 0.0625), scale=(0.95, 1.05), rotate=(-10, 10), border_mode=_REFLECT, p=0.5
    )


def official_weak_pipeline(image_size: int):
    """Labeled rows: flips, brightness/contrast (p 0.2), shift-scale-rotate, 5-8 holes of size/20 (p 0.5)."""
    import albumentations as A

    hole = max(1, image_size // 20)
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomBrightnessContrast(p=0.2),
            _shift_scale_rotate(),
            A.CoarseDropout(
                num_holes_range=(5, 8),
                hole_height_range=(hole, hole),
                hole_width_range=(hole, hole),
                fill=0,
                fill_mask=0,
                p=0.5,
            ),
        ]
    )


def official_strong_pipeline(image_size: int):
    """Unlabeled rows: flips, brightness/contrast (p 0.6), shift-scale-rotate, grid or elastic
    distortion (p 0.5), 10-20 holes of 12 px (p 0.7; the official fixes 256 // 20 at any size).

    The official ``ElasticTransform(alpha=1, sigma=50, alpha_affine=50)`` (albumentations 1.x) is a
    random affine (anchor points moved by up to 50 px) and then a smoothed displacement; version 2
    dropped ``alpha_affine``, so the affine is :class:`ThreePointAffine`, before version 2's elastic
    displacement. 50 px is for the official 256 px images: it scales with the image, because the
    anchor points sit a third of the side from the centre (at 32 px, 50 px would be five times that).
    """
    import albumentations as A

    from knowsam.data.three_point_affine import ThreePointAffine

    hole = 256 // 20
    elastic = A.Sequential(
        [
            ThreePointAffine(alpha_affine=50 * image_size / 256, border_mode=_REFLECT),
            A.ElasticTransform(alpha=1, sigma=50, border_mode=_REFLECT, p=1.0),
        ],
        p=1.0,
    )
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomBrightnessContrast(p=0.6),
            _shift_scale_rotate(),
            A.OneOf([A.GridDistortion(num_steps=5, distort_limit=0.05, border_mode=_REFLECT, p=1.0), elastic], p=0.5),
            A.CoarseDropout(
                num_holes_range=(10, 20),
                hole_height_range=(hole, hole),
                hole_width_range=(hole, hole),
                fill=0,
                fill_mask=0,
                p=0.7,
            ),
        ]
    )


class WeakStrongAugment:
    """Weak augmentation for labeled rows (image and mask alike), strong for unlabeled rows.

    Per-image numpy work (albumentations), seeded per batch from the caller's torch generator,
    so the stream's saved generator state still makes a resumed run see the same batches.
    With ``record_geometry``, ``geometry`` is what the last call did to each row's pixels (labeled
    rows, then unlabeled); only a teacher that sees the un-augmented images needs it, and composing
    the warps and their inverses adds about 40% to the augmentation's time (16 images at 256 px,
    one CPU thread: 0.40 s instead of 0.28 s).
    """

    def __init__(self, image_size: int, record_geometry: bool = False):
        import albumentations as A

        self.image_size, self.record_geometry = image_size, record_geometry
        # Recording the applied parameters changes no draw: the same seed gives the same images.
        self.weak = A.Compose(official_weak_pipeline(image_size).transforms, save_applied_params=True)
        self.strong = A.Compose(official_strong_pipeline(image_size).transforms, save_applied_params=True)
        self.geometry = ViewGeometry.identity(0)

    def __call__(
        self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        self.weak.set_random_seed(seed)
        self.strong.set_random_seed(seed + 1)
        labeled = [self.weak(image=_hwc(x), mask=y.numpy()) for x, y in zip(x_l, y_l)]
        unlabeled = [self.strong(image=_hwc(x)) for x in x_u]
        if self.record_geometry:
            self.geometry = self._geometry(labeled + unlabeled)
        x_l = _chw([d["image"] for d in labeled], x_l)
        y_l = torch.from_numpy(np.stack([d["mask"] for d in labeled])) if labeled else y_l
        return x_l, y_l.to(torch.int64), _chw([d["image"] for d in unlabeled], x_u)

    def _geometry(self, results: list[dict]) -> ViewGeometry:
        rows = [warp_from_albumentations(r["applied_transforms"], self.image_size) for r in results]
        n = len(rows)
        geometry = ViewGeometry(
            torch.tensor([r[0] for r in rows], dtype=torch.bool).reshape(n),
            torch.tensor([r[1] for r in rows], dtype=torch.bool).reshape(n),
            torch.zeros(n, dtype=torch.int64),
        )
        if any(r[2] is not None for r in rows):
            identity = identity_map(1, self.image_size)[0]
            geometry.warp = torch.stack([torch.from_numpy(r[2]) if r[2] is not None else identity for r in rows])
            geometry.unwarp = torch.stack([torch.from_numpy(r[3]) if r[3] is not None else identity for r in rows])
        return geometry


def _hwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def _chw(images: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    if not images:
        return like
    out = torch.from_numpy(np.stack([im.reshape(im.shape[0], im.shape[1], -1) for im in images]))
    return out.permute(0, 3, 1, 2).clamp(0, 1).to(like.dtype).contiguous()
