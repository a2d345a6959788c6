"""Named CLIP architectures. Names and sizes follow open_clip's model names, so a researcher's
`ViT-B-32` here is the same network as there (parameter counts are tested equal).

`*-quickgelu` variants use OpenAI's QuickGELU: OpenAI's released weights need it, and running them
with exact GELU silently costs about 2.7 points of ImageNet zero-shot accuracy.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from clip_jax.cli import UserError, did_you_mean

VisionLayers = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 224
  layers: VisionLayers = 12          # an int: ViT depth; a tuple: ResNet blocks per stage
  width: int = 768
  patch_size: int | None = 32        # None: ModifiedResNet
  head_width: int = 64
  mlp_ratio: float = 4.0

  @property
  def is_resnet(self) -> bool:
    return self.patch_size is None

  @property
  def heads(self) -> int:
    # A ResNet's attention pool runs over width*32 channels (the last stage's output).
    return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclasses.dataclass(frozen=True)
class TextConfig:
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_ratio: float = 4.0
  # Where the text is pooled: at the first `eot_token_id` (Hugging Face checkpoints state it), or at
  # argmax(token id) when None (OpenAI's rule, and open_clip's default): equal while the end token
  # has the largest id, which added tokens break.
  eot_token_id: int | None = None

  @property
  def pooling_token(self) -> int | None:
    """eot_token_id with the vocabulary's last id as None: both pool at the same token, so two configs
    that differ only there compute the same model (a Hugging Face config states 49407)."""
    return None if self.eot_token_id == self.vocab_size - 1 else self.eot_token_id


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  embed_dim: int = 512
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  act: str = "gelu"                         # 'gelu' (exact) or 'quick_gelu'
  init_logit_scale: float = math.log(1 / 0.07)
  init_logit_bias: float | None = None       # set (e.g. -10) for a SigLIP-style sigmoid loss

  def replace(self, **overrides: Any) -> "CLIPConfig":
    """Copy with overrides; `vision` / `text` may be dicts of their own fields."""
    for key in ("vision", "text"):
      if isinstance(overrides.get(key), dict):
        unknown = set(overrides[key]) - {f.name for f in dataclasses.fields(getattr(self, key))}
        if unknown:
          raise ValueError(f"Unknown {key} config keys {sorted(unknown)}.")
        overrides[key] = dataclasses.replace(getattr(self, key), **overrides[key])
    unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ValueError(f"Unknown CLIP config keys {sorted(unknown)}; valid: "
                       f"{sorted(f.name for f in dataclasses.fields(self))}.")
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    d = dict(d)
    vision = dict(d.pop("vision", {}))
    if isinstance(vision.get("layers"), list):
      vision["layers"] = tuple(vision["layers"])
    return cls(vision=VisionConfig(**vision), text=TextConfig(**d.pop("text", {})), **d)


def _resnet(embed_dim, layers, width, image_size, text_width, text_heads) -> CLIPConfig:
  return CLIPConfig(embed_dim, VisionConfig(image_size, tuple(layers), width, patch_size=None),
                    TextConfig(width=text_width, heads=text_heads))


def _vit(embed_dim, image_size, layers, width, patch_size, text_width, text_heads, text_layers=12,
         head_width=64) -> CLIPConfig:
  return CLIPConfig(embed_dim, VisionConfig(image_size, layers, width, patch_size, head_width),
                    TextConfig(width=text_width, heads=text_heads, layers=text_layers))


_BASE_CONFIGS = {
    "RN50": _resnet(1024, (3, 4, 6, 3), 64, 224, 512, 8),
    "RN101": _resnet(512, (3, 4, 23, 3), 64, 224, 512, 8),
    "RN50x4": _resnet(640, (4, 6, 10, 6), 80, 288, 640, 10),
    "RN50x16": _resnet(768, (6, 8, 18, 8), 96, 384, 768, 12),
    "RN50x64": _resnet(1024, (3, 15, 36, 10), 128, 448, 1024, 16),
    "ViT-B-32": _vit(512, 224, 12, 768, 32, 512, 8),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, 512, 8),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, 768, 12),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, 768, 12),
    "ViT-H-14": _vit(1024, 224, 32, 1280, 14, 1024, 16, text_layers=24, head_width=80),
    # Tiny configs: tests and the embedded digits demo (32 px images, short captions).
    "ViT-Tiny": CLIPConfig(64, VisionConfig(32, 2, 64, 8), TextConfig(32, 49408, 64, 2, 2)),
    "RN-Tiny": CLIPConfig(64, VisionConfig(64, (1, 1, 1, 1), 16, None, head_width=64),
                          TextConfig(32, 49408, 64, 2, 2)),
}

MODEL_CONFIGS: dict[str, CLIPConfig] = {
    **_BASE_CONFIGS,
    **{f"{name}-quickgelu": cfg.replace(act="quick_gelu") for name, cfg in _BASE_CONFIGS.items()},
}


def get_config(name: str) -> CLIPConfig:
  if name not in MODEL_CONFIGS:
    raise UserError(f"Unknown model '{name}';{did_you_mean(name, MODEL_CONFIGS)} known models: {', '.join(sorted(MODEL_CONFIGS))}.")
  return MODEL_CONFIGS[name]
