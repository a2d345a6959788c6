"""Image decoding that survives real-world files, and CLIP's train / eval transforms.

`load_image` is the one place an image is opened: whatever arrives (encoded bytes of any PIL
format, or a decoded uint8/uint16 array from TFDS) becomes a decoded, upright PIL image in its own
mode, or BadRecord with a reason. EXIF orientation is applied for every format that carries it
(JPEG, PNG, WebP, TIFF, ...). Everything that reads images (the CLIP pipeline, `prepare`, the
evaluation sources, DreamBooth's folders) goes through it.

The transforms follow the CLIP paper as open_clip implements it: RandomResizedCrop(scale=(0.9,
1.0)) for training, Resize(shortest side) + CenterCrop for evaluation, both bicubic, then OpenAI's
mean/std. Evaluation also takes a model's own settings (`Preprocessing`: mean/std, bilinear, open_clip's
'longest' and 'squash' resize modes); training always preprocesses as OpenAI's CLIP. Mode handling
differs on purpose between the two:
  evaluation (`eval_transform`, `clip_jax.preprocess`): open_clip's order, resize and crop in the
    image's own mode, convert to RGB last, so pretrained OpenAI/open_clip weights see exactly the
    pixels their reference numbers were measured on (a palette image is resampled with NEAREST,
    alpha is dropped, as there). Only 16/32-bit and float gray differ: open_clip's convert("RGB")
    saturates them at 255 (a white image); here they keep their top 8 bits.
  training (`decode_image`, then `train_transform`): convert first (`to_rgb`): transparent pixels
    become white instead of whatever colour they happen to store, palettes are expanded before the
    bicubic crop (no NEAREST aliasing), 16-bit gray keeps its top 8 bits. This is what a person sees
    in a viewer, which is what the caption describes.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_jax.data.records import BadRecord

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}  # what open_clip's eval transform has
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """A model's evaluation preprocessing, open_clip's `preprocess_cfg` terms: `mean` / `std` (per RGB
  channel, 0..1 units), `interpolation` ('bicubic' | 'bilinear'), `resize_mode` ('shortest': the
  shortest side to the size, centre crop; 'longest': the longest side to the size, padded to a square
  with `fill_color`; 'squash': both sides to the size) and `fill_color` (0..255, in the image's own
  mode, as torchvision pads). `OPENAI` is OpenAI's CLIP, every model's default; a checkpoint's own:
  `clip_jax.convert.stated_preprocessing`. Raises ValueError for what open_clip's eval transform
  does not have."""
  mean: tuple[float, float, float] = OPENAI_MEAN
  std: tuple[float, float, float] = OPENAI_STD
  interpolation: str = "bicubic"
  resize_mode: str = "shortest"
  fill_color: int = 0

  def __post_init__(self):
    for name in ("mean", "std"):  # one number for all channels is allowed, as open_clip and transformers do
      try:
        values = tuple(float(v) for v in np.broadcast_to(np.asarray(getattr(self, name), np.float64), (3,)))
      except (TypeError, ValueError):
        raise ValueError(f"preprocessing {name} must be 3 numbers (or one), got {getattr(self, name)!r}.") from None
      if name == "std" and min(values) <= 0:
        raise ValueError(f"preprocessing std must be positive, got {list(values)}.")
      object.__setattr__(self, name, values)
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"preprocessing interpolation {self.interpolation!r} is not supported: "
                       f"{' or '.join(map(repr, INTERPOLATIONS))}, as open_clip's eval transform has.")
    if self.resize_mode not in RESIZE_MODES:
      raise ValueError(f"preprocessing resize_mode {self.resize_mode!r} is not supported: "
                       f"{', '.join(map(repr, RESIZE_MODES))}, as open_clip's eval transform has.")
    if not isinstance(self.fill_color, (int, np.integer)) or isinstance(self.fill_color, bool):
      raise ValueError(f"preprocessing fill_color must be one integer 0..255, got {self.fill_color!r}.")

  def describe(self) -> str:
    """One line: 'mean [0.485, 0.456, 0.406], std [...], bilinear, squash'."""
    rounded = lambda values: [round(v, 4) for v in values]  # noqa: E731
    text = f"mean {rounded(self.mean)}, std {rounded(self.std)}, {self.interpolation}, resize {self.resize_mode}"
    return text + (f" (fill {self.fill_color})" if self.resize_mode == "longest" else "")

  def to_dict(self) -> dict:
    """JSON-able, open_clip's preprocess_cfg keys (results' meta, config records)."""
    return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
            "resize_mode": self.resize_mode, "fill_color": int(self.fill_color)}


OPENAI = Preprocessing()

# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): ~89.5M pixels, ~268 MB as RGB.
DEFAULT_MAX_PIXELS = 89_478_485
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
  """Reads only the header: the size check happens before any pixel is decoded."""
  if len(data) == 0:
    raise BadRecord("empty_image", "0 bytes")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise BadRecord("image_too_large", str(e)) from e
  except UnidentifiedImageError as e:  # its message names a BytesIO object's address, nothing of the file
    raise BadRecord("corrupt_image", "not an image format PIL can read") from e
  except (OSError, SyntaxError, ValueError) as e:
    raise BadRecord("corrupt_image", f"{type(e).__name__}: {e}") from e
  width, height = image.size
  if width * height > max_pixels:
    raise BadRecord("image_too_large", f"{width}x{height} is over the {max_pixels}-pixel limit")
  if width < 1 or height < 1:
    raise BadRecord("corrupt_image", f"{width}x{height} image")
  return image


def mode_repairs(mode: str) -> list[str]:
  """['mode_<MODE>'] for modes other than the two everyday ones (RGB, L), else []: the count the
  pipeline and `prepare` report as a repair."""
  return [] if mode in ("RGB", "L") else [f"mode_{mode}"]


def _high_depth_to_l(image: Image.Image) -> Image.Image:
  """I;16*, I, F -> L. PIL's convert clips at 255 (a white image); rescale instead: 16-bit values
  keep their top 8 bits (also 32-bit 'I' whose values exceed 255), floats up to 1.0 are scaled
  by 255, NaN becomes 0."""
  mode = image.mode
  values = np.asarray(image)
  if mode == "F":
    peak = float(np.nanmax(values)) if values.size else 0.0
    values = np.nan_to_num(values) * (255.0 if peak <= 1.0 else 1.0)
  elif mode.startswith("I;16") or values.max(initial=0) > 255:
    values = values.astype(np.int64) >> 8
  return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")


def _is_high_depth(mode: str) -> bool:
  return mode.startswith("I") or mode == "F"


def to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
  """Any PIL mode -> (RGB image, repairs), the training pipeline's conversion (before any crop).

  Transparent pixels (RGBA, LA, PA, P with a transparency entry) are composited on white; 16/32-bit
  and float gray keep their top 8 bits (`_high_depth_to_l`); every other mode (P, 1, CMYK, YCbCr,
  ...) is PIL's convert("RGB"). Repairs: `mode_repairs(mode)`.
  """
  mode = image.mode
  if mode in ("RGB", "L"):  # the two everyday modes; gray -> RGB is no repair
    return (image if mode == "RGB" else image.convert("RGB")), []
  if mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode in ALPHA_MODES:
    # Plain convert("RGB") would expose whatever color the transparent pixels happen to hold.
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  elif _is_high_depth(mode):
    image = _high_depth_to_l(image)
  return image.convert("RGB"), mode_repairs(mode)


def to_rgb_last(image: Image.Image) -> Image.Image:
  """open_clip's final conversion (its eval transform's `convert("RGB")` after the crop): alpha is
  dropped, palettes are looked up; only 16/32-bit and float gray go through `_high_depth_to_l`
  where open_clip would saturate them at 255."""
  if image.mode == "RGB":
    return image
  if _is_high_depth(image.mode):
    image = _high_depth_to_l(image)
  with warnings.catch_warnings():
    # "Palette images with Transparency expressed in bytes should be converted to RGBA": dropping
    # the transparency is what open_clip does here.
    warnings.simplefilter("ignore", UserWarning)
    return image.convert("RGB")


def load_image(data, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
  """bytes (any PIL format) or an array ([h, w] / [h, w, 1|3|4] uint8, [h, w] uint16) -> a decoded,
  upright PIL image in its own mode. The one place this project opens an image.

  EXIF orientation (tag 0x0112) is applied for every format that stores it, not only JPEG.
  `draft_size` lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) as long as both sides stay at
  least that large; it makes big photos several times cheaper to decode.
  Raises BadRecord: empty_image, corrupt_image (undecodable, truncated, not an image array),
  image_too_large (over `max_pixels`, checked from the header before decoding).
  """
  if isinstance(data, np.ndarray):
    return _array_to_image(data)
  image = open_image(bytes(data), max_pixels)
  try:
    if draft_size and image.format == "JPEG":
      image.draft(None, (draft_size, draft_size))
    image.load()
    return _apply_exif_orientation(image)
  except Image.DecompressionBombError as e:
    raise BadRecord("image_too_large", str(e)) from e
  except Exception as e:  # truncated data, broken chunks, plugin errors: all mean "cannot decode"
    raise BadRecord("corrupt_image", f"{type(e).__name__}: {e}") from e


def decode_image(data, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None) -> tuple[Image.Image, list[str]]:
  """The training decoder: `load_image` then `to_rgb` -> (RGB image, repairs). Raises BadRecord
  as `load_image` does."""
  return to_rgb(load_image(data, max_pixels, draft_size))


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
  # Phone photos are stored sideways with an EXIF rotation tag; captions describe them upright.
  # PIL reads the tag from JPEG, PNG (eXIf), WebP, TIFF and others, so every format gets this.
  if image.getexif().get(0x0112, 1) != 1:
    return ImageOps.exif_transpose(image)
  return image


def _array_to_image(array: np.ndarray) -> Image.Image:
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0:
    raise BadRecord("corrupt_image", f"array of shape {array.shape} is not an image")
  if array.dtype == np.uint16 and array.ndim == 2:
    return Image.fromarray(array)
  if array.dtype != np.uint8:
    raise BadRecord("corrupt_image", f"array of dtype {array.dtype}; expected uint8")
  mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.ndim if array.ndim == 2 else array.shape[-1]]
  return Image.fromarray(np.ascontiguousarray(array), mode)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop sampling -> (left, top, right, bottom) in pixels."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return left, top, left + crop_w, top + crop_h
  # Fallback: the largest central crop whose aspect ratio is inside `ratio`.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    crop_w, crop_h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    crop_w, crop_h = int(round(height * ratio[1])), height
  else:
    crop_w, crop_h = width, height
  top, left = (height - crop_h) // 2, (width - crop_w) // 2
  return left, top, left + crop_w, top + crop_h


def train_transform(image: Image.Image, size: int, rng: np.random.Generator,
                    scale=(0.9, 1.0)) -> np.ndarray:
  """Random resized crop to [size, size, 3] uint8, cropping and resampling in one bicubic pass."""
  box = random_resized_crop_box(image.width, image.height, rng, scale)
  return np.asarray(image.resize((size, size), Image.BICUBIC, box=box))


def eval_transform(image: Image.Image, size: int, preprocessing: Preprocessing = OPENAI) -> np.ndarray:
  """open_clip's eval transform of a PIL image of any mode -> [size, size, 3] uint8, then convert to RGB.

  `preprocessing.resize_mode`: 'shortest' (OpenAI's): the shortest side resized to `size`, centre crop;
  'longest': the longest side resized to `size` (the other rounded, as open_clip's ResizeKeepRatio),
  padded to a square with `fill_color` (torchvision's pad, in the image's own mode); 'squash': resized to
  size x size. Resampling with `preprocessing.interpolation` (bicubic or bilinear).

  Bit-identical to open_clip's `image_transform(size, is_train=False, interpolation=..., resize_mode=...,
  fill_color=...)` (torchvision on PIL images, then convert("RGB")), which OpenAI's preprocessing also
  runs, in the same order: the resampling happens in the image's own mode, so a palette ('P') or bilevel
  ('1') image is resampled with NEAREST (PIL's rule for those modes) and RGBA/LA with premultiplied
  alpha, and the alpha channel is dropped only at the end (`to_rgb_last`). Differs only for 16/32-bit
  and float gray, which keep their top 8 bits where open_clip saturates them at 255. For extreme aspect
  ratios the crop's source box is resampled directly instead, so a 1 x 100000 image never becomes a
  224 x 22400000 intermediate.
  """
  resample = INTERPOLATIONS[preprocessing.interpolation]
  width, height = image.size
  if preprocessing.resize_mode == "squash":
    if (width, height) != (size, size):
      image = image.resize((size, size), resample)
    return np.asarray(to_rgb_last(image))
  if preprocessing.resize_mode == "longest":
    ratio = max(height / size, width / size)  # open_clip's ResizeKeepRatio(longest=1), its float arithmetic
    new_h, new_w = (round(x * 1.0 / ratio) for x in (height, width))
    if (new_w, new_h) != (width, height):
      image = image.resize((new_w, new_h), resample)
    return np.asarray(to_rgb_last(_center_crop_or_pad(image, size, preprocessing.fill_color)))
  if width <= height:
    new_w, new_h = size, int(size * height / width)
  else:
    new_w, new_h = int(size * width / height), size
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  if max(new_w, new_h) > 8 * size:
    scale_x, scale_y = width / new_w, height / new_h
    box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
    return np.asarray(to_rgb_last(image.resize((size, size), resample, box=box)))
  if (new_w, new_h) != (width, height):
    image = image.resize((new_w, new_h), resample)
  return np.asarray(to_rgb_last(image.crop((left, top, left + size, top + size))))


def _center_crop_or_pad(image: Image.Image, size: int, fill: int) -> Image.Image:
  """open_clip's CenterCropOrPad on a PIL image: pad (torchvision's F.pad: `fill` for every band, in the
  image's own mode, a palette image's index) to at least size x size, then centre crop."""
  width, height = image.size
  if size > width or size > height:
    pad_w, pad_h = max(size - width, 0), max(size - height, 0)
    border = (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2)
    bands = len(image.getbands())
    color = int(fill) if bands == 1 else tuple([int(fill)] * bands)  # torchvision's _parse_fill
    palette = image.getpalette() if image.mode == "P" else None
    image = ImageOps.expand(image, border=border, fill=color)
    if palette is not None:
      image.putpalette(palette)
    width, height = image.size
  top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


# uint8 value -> normalized float32, per channel: a table lookup is ~1.5x cheaper than the
# arithmetic and gives the same float32 numbers. One table per mean/std.
@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  table = ((np.arange(256, dtype=np.float32)[:, None] - np.float32(255) * np.asarray(mean, np.float32))
           / (np.float32(255) * np.asarray(std, np.float32))).T.copy()  # [3, 256]
  table.flags.writeable = False
  return table


def normalize(pixels: np.ndarray, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
  """uint8 [..., 3] -> float32 [..., 3]: (x / 255 - mean) / std, OpenAI CLIP's mean/std by default
  (a model's own: `Preprocessing.mean` / `.std`)."""
  table = _normalize_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))
  out = np.empty(pixels.shape, np.float32)
  for channel in range(3):
    np.take(table[channel], pixels[..., channel], out=out[..., channel])
  return out
