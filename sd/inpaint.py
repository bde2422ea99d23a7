"""Inpainting image helpers: plain PIL/numpy/torch functions, no model.

- Inputs: `load_image` (PIL image, path or array -> PIL, with a one-line error for anything else), `image_to_tensor`
  (RGB uint8 -> x / 127.5 - 1), `mask_to_tensor` (mode L, / 255, 1 where >= 0.5; white = repaint), `check_mask`.
- AUTOMATIC1111's inpaint options (`modules/processing.py`, `modules/masking.py`): `blur_mask` (Gaussian blur of the
  mask), `masked_crop_box` + `crop_to` ("only masked": the mask's bounding box plus padding, expanded to the output
  aspect ratio, cropped and resized to W x H), `fill_masked` ("masked content: fill"), `paste_back` (the result
  inside the mask over the original outside it, through the crop box when there is one).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

Tensor = torch.Tensor
MASKED_CONTENT = ("original", "fill")
INPAINT_AREA = ("whole picture", "only masked")


def load_image(value, what: str = "image") -> Image.Image:
    """A PIL image from a PIL image, a file path or an (H, W[, C]) uint8 array; ValueError saying what to give."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        try:
            img = Image.open(value)
            img.load()
            return img
        except FileNotFoundError:
            raise ValueError(f"{what} {os.fspath(value)!r}: no such file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{what} {os.fspath(value)!r} is not an image ({type(e).__name__}); "
                             "give a PNG, JPEG or WebP file") from None
    if isinstance(value, np.ndarray) and value.ndim in (2, 3):
        return Image.fromarray(value.astype(np.uint8))
    raise ValueError(f"{what} must be an image (PIL image, file path or uint8 array), got {type(value).__name__}")


def image_to_tensor(image: Image.Image) -> Tensor:
    """RGB uint8 -> (1, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1), at the image's own size."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(arr / 127.5 - 1).permute(2, 0, 1)[None].contiguous()


def mask_to_tensor(mask: Image.Image) -> Tensor:
    """Mode L, / 255, binarised: (1, 1, H, W) float32, 1 where >= 0.5 (white = repaint), else 0."""
    m = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0  # (H, W)
    return torch.from_numpy((m >= 0.5).astype(np.float32))[None, None]


def check_mask(image: Image.Image, mask: Image.Image) -> None:
    """Refuse a mask of another size than the image, or one with nothing to repaint."""
    if mask.size != image.size:
        raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}; "
                         "give a mask of the image's size")
    if not bool(mask_to_tensor(mask).any()):
        raise ValueError("the mask is all black (nothing to repaint); paint the area to repaint white")


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """A1111's "Mask blur": a Gaussian blur of the mask (mode L) with this radius in pixels; 0 = unchanged."""
    mask = mask.convert("L")
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def masked_crop_box(mask: Image.Image, width: int, height: int, padding: int = 32) -> tuple[int, int, int, int]:
    """A1111's "only masked" region: the bounding box of the mask's non-zero pixels grown by `padding` (clipped to
    the image), then expanded to the output aspect ratio width:height (`get_crop_region` + `expand_crop_region`).
    Returns (x1, y1, x2, y2), right/bottom exclusive."""
    w, h = mask.size
    box = mask.convert("L").point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        raise ValueError("the mask is all black (nothing to repaint); paint the area to repaint white")
    x1, y1, x2, y2 = max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, w), min(box[3] + padding, h)
    if (x2 - x1) / (y2 - y1) > width / height:   # too wide: grow the height
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:                                          # too tall: grow the width
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, diff: int, size: int) -> tuple[int, int]:
    """Grow [lo, hi) by diff, half on each side, shifted back inside [0, size) (A1111's expand_crop_region)."""
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        hi, lo = hi - lo, 0
    return lo, min(hi, size)


def crop_to(image: Image.Image, box: tuple[int, int, int, int], width: int, height: int,
            resample=Image.LANCZOS) -> Image.Image:
    """Crop `box` out of the image and resize it to width x height (masks: pass resample=Image.NEAREST or keep
    LANCZOS and let `mask_to_tensor` binarise)."""
    return image.crop(box).resize((width, height), resample)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "Masked content: fill" (`masking.fill`): the masked area painted with ever less blurred colours of
    the surrounding unmasked pixels; unmasked pixels unchanged."""
    out = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def paste_back(original: Image.Image, result: Image.Image, mask: Image.Image,
               box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The result where the mask is white, the original where it is black, blended by the (blurred) mask's grey
    levels. With a crop `box` the result (of any size) is first resized into the box of a copy of the original."""
    original = original.convert("RGB")
    full = original.copy()
    if box is not None:
        full.paste(result.convert("RGB").resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
    else:
        full = result.convert("RGB").resize(original.size, Image.LANCZOS) if result.size != original.size else result.convert("RGB")
    return Image.composite(full, original, mask.convert("L"))
