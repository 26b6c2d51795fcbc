"""DINO multi-crop augmentation (Caron et al. 2021, Sec. 3.1 and App. D) and the k-NN evaluation transform.

Two global crops and `n_local` local crops per image, each with its own random crop, flip, colour jitter,
grayscale and blur; global crop 1 is always blurred, global crop 2 rarely blurred but sometimes solarised.
Geometry and colour run on the PIL image (PIL's C paths are the fast ones on CPU, and solarise thresholds
at 128 on uint8); the tensor conversion and normalisation come last. Randomness comes from torch's global
generator, which `ImageFileDataset` seeds per item.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_SIGMA = (0.1, 2.0)  # in pixels of the output crop, whatever its size (as in the paper)
_BICUBIC = v2.InterpolationMode.BICUBIC


class RandomGaussianBlur:
    """Blur with sigma drawn uniformly in `sigma` pixels through PIL (radius = sigma), as the paper's code does.

    PIL's box-approximated Gaussian is not truncated and costs ~2 ms on a 224 px crop against ~12 ms for
    torchvision's 23-tap convolution (which converts PIL to tensor and back). Sigma comes from torch's
    global generator so the per-item seed covers it.
    """

    def __init__(self, sigma: tuple[float, float] = BLUR_SIGMA) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = torch.empty(()).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def _to_normalized_tensor() -> list[v2.Transform]:
    """PIL -> float32 CHW in [0, 1] -> ImageNet-normalised plain tensor."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ]


def _crop_pipeline(
    size: int, scale: tuple[float, float], blur_p: float, blur_sigma: tuple[float, float], color_strength: float,
    solarize_p: float = 0.0,
) -> v2.Compose:
    """One crop's recipe, in the paper's order: crop, flip, jitter, grayscale, blur, solarise, normalise."""
    steps = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=_BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([_color_jitter(color_strength)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([RandomGaussianBlur(blur_sigma)], p=blur_p),
    ]
    if solarize_p:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return v2.Compose([*steps, *_to_normalized_tensor()])


def _color_jitter(strength: float) -> v2.ColorJitter:
    """The paper's jitter (0.4, 0.4, 0.2, 0.1) times `strength` (SimCLR's colour strength s); hue capped at 0.5."""
    return v2.ColorJitter(
        brightness=0.4 * strength, contrast=0.4 * strength, saturation=0.2 * strength, hue=min(0.1 * strength, 0.5)
    )


def _check_scale(name: str, scale: tuple[float, float]) -> None:
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {scale}")


class MultiCrop:
    """PIL image -> [global 1, global 2, local 1, ..., local n_local], float32 (3, size, size) tensors.

    A class rather than a closure so loader workers can pickle it under any start method.
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        n_local: int,
        global_scale: tuple[float, float],
        local_scale: tuple[float, float],
        blur_sigma: tuple[float, float] = BLUR_SIGMA,
        color_strength: float = 1.0,
    ) -> None:
        if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {blur_sigma}")
        if color_strength < 0:
            raise ValueError(f"color_strength must be >= 0, got {color_strength}")
        if global_size < 1 or local_size < 1 or n_local < 0:
            raise ValueError(f"need sizes >= 1 and n_local >= 0, got {global_size}, {local_size}, {n_local}")
        _check_scale("global_scale", global_scale)
        _check_scale("local_scale", local_scale)
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        # kept as the recipe the GPU backends read (fastdino/data/gpu_augment.py, dali.py)
        self.global_scale, self.local_scale, self.blur_sigma = global_scale, local_scale, blur_sigma
        self.color_strength = color_strength
        common = {"blur_sigma": blur_sigma, "color_strength": color_strength}
        self.global1 = _crop_pipeline(global_size, global_scale, blur_p=1.0, **common)
        self.global2 = _crop_pipeline(global_size, global_scale, blur_p=0.1, solarize_p=0.2, **common)
        self.local = _crop_pipeline(local_size, local_scale, blur_p=0.5, **common)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]


def multicrop_transform(
    global_size: int = 224,
    local_size: int = 96,
    n_local: int = 10,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    blur_sigma: tuple[float, float] = BLUR_SIGMA,
    color_strength: float = 1.0,
) -> MultiCrop:
    """DINO's multi-crop; the paper widens global_scale to (0.14, 1.0) when n_local == 0: the caller decides.

    blur_sigma is in pixels of the output crop; the paper's (0.1, 2.0) is meant for 224 px crops, so tiny
    crops (the 32 px CPU demo) scale it down or the blur wipes out the image. color_strength scales the colour
    jitter: raise it when colour alone tells images apart, or DINO learns colour instead of content.
    """
    return MultiCrop(
        global_size, local_size, n_local, tuple(global_scale), tuple(local_scale), tuple(blur_sigma), color_strength
    )


def eval_transform(size: int = 224) -> v2.Compose:
    """k-NN / linear-probe view: resize the short side to size * 256/224 (bicubic), centre-crop, normalise."""
    return v2.Compose(
        [
            v2.Resize(int(size * 256 / 224), interpolation=_BICUBIC, antialias=True),
            v2.CenterCrop(size),
            *_to_normalized_tensor(),
        ]
    )
