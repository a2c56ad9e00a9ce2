"""Training augmentations on a whole uint8 batch at once, with per-image random parameters.

Hand-written: torchvision's v2 transforms draw one set of random parameters per call, so a batch
would share one crop and one jitter; per-image crops in one pass need one affine grid per image.
The same code runs in a DataLoader worker (CPU) or on the model's device (GPU), so where it runs
changes speed, not the distribution. Random parameters are drawn on the CPU generator either way.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = torch.linalg.inv(_YIQ)
_GRAY = torch.tensor([0.299, 0.587, 0.114])


class BatchAugment:
    """uint8 (B, 3, H, W) -> normalised float (B, 3, size, size).

    Per image: a random resized crop (area `scale`, aspect `ratio`) rotated by up to `degrees`
    (corners filled black, like the endoscope's own border), then brightness, contrast, saturation
    and hue jitter in that order, then the model's normalisation. The hue jitter rotates the YIQ
    chroma plane by 2*pi*h, a linear stand-in for an HSV hue shift.
    """

    def __init__(self, size: int, mean, std, scale=(0.7, 1.0), ratio=(0.85, 1.15), degrees: float = 10.0,
                 brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.15, hue: float = 0.02):
        self.size, self.scale, self.ratio, self.degrees = size, scale, ratio, degrees
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def params(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-image parameters, drawn on the CPU (the same stream whatever device applies them)."""
        u = torch.rand(n, 9, generator=generator)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[:, 1]
        w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop side as a fraction of the image side
        h = (area / log_r.exp()).sqrt().clamp(max=1.0)
        return {
            "w": w, "h": h,
            "cx": (1 - w) * (2 * u[:, 2] - 1), "cy": (1 - h) * (2 * u[:, 3] - 1),  # crop stays inside
            "angle": math.radians(self.degrees) * (2 * u[:, 4] - 1),
            "brightness": 1 + self.brightness * (2 * u[:, 5] - 1),
            "contrast": 1 + self.contrast * (2 * u[:, 6] - 1),
            "saturation": 1 + self.saturation * (2 * u[:, 7] - 1),
            "hue": self.hue * (2 * u[:, 8] - 1),
        }

    def __call__(self, images: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        p = self.params(len(images)) if params is None else params
        dev = images.device
        p = {k: v.to(dev) for k, v in p.items()}
        x = images.float().div_(255)
        # output grid -> input: centre + R(angle) @ diag(w, h); inputs are square, so no aspect term
        cos, sin = p["angle"].cos(), p["angle"].sin()
        theta = torch.stack([torch.stack([cos * p["w"], -sin * p["h"], p["cx"]], 1),
                             torch.stack([sin * p["w"], cos * p["h"], p["cy"]], 1)], 1)
        grid = F.affine_grid(theta, [len(x), 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = self.jitter(x, p)
        return (x - self.mean.to(dev)) / self.std.to(dev)

    @staticmethod
    def jitter(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        def per_image(v):
            return v.view(-1, 1, 1, 1)

        gray_w = _GRAY.to(x.device).view(1, 3, 1, 1)
        x = (x * per_image(p["brightness"])).clamp_(0, 1)
        mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = ((x - mean) * per_image(p["contrast"]) + mean).clamp_(0, 1)
        gray = (x * gray_w).sum(1, keepdim=True)
        x = ((x - gray) * per_image(p["saturation"]) + gray).clamp_(0, 1)
        a = 2 * math.pi * p["hue"]
        rot = torch.zeros(len(x), 3, 3, device=x.device)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
        m = _YIQ_INV.to(x.device) @ rot @ _YIQ.to(x.device)  # (B, 3, 3) colour matrix per image
        return torch.einsum("bij,bjhw->bihw", m, x).clamp_(0, 1)
