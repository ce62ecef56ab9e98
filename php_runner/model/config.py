"""Model dimensions and switches. Defaults are the paper configuration (spec sections 2 and 3)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

VARIANTS = ("base", "crfm", "efp", "full")
SHARINGS = ("shared", "separate")
COUPLINGS = ("official", "per-sample")


@dataclass(frozen=True)
class ClipConfig:
    """CLIP backbone dimensions; the defaults are OpenAI ViT-B/16 at PHP's 384x128 input."""

    embed_dim: int = 512
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    patch_size: int = 16
    stride: int = 16
    image_size: tuple[int, int] = (384, 128)  # (H, W)
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) for ``image_size`` with ``stride``."""
        h, w = self.image_size
        return ((h - self.patch_size) // self.stride + 1, (w - self.patch_size) // self.stride + 1)


@dataclass(frozen=True)
class PHPConfig:
    """PHP head dimensions and the three independent switches (variant, sharing, coupling)."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    cnum: int = 9
    num_experts: int = 4
    topk: int = 2
    reduction: int = 8
    efp_layers: int = 4
    efp_heads: int = 8
    variant: str = "full"
    sharing: str = "shared"
    coupling: str = "official"
    num_classes: int = 0  # > 0 adds the id-loss classifier (spec 3.3)

    def __post_init__(self) -> None:
        for name, allowed in (("variant", VARIANTS), ("sharing", SHARINGS), ("coupling", COUPLINGS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk must be between 1 and num_experts ({self.num_experts}), got {self.topk}")
        if self.clip.embed_dim % self.efp_heads:
            raise ValueError(f"efp_heads ({self.efp_heads}) must divide embed_dim ({self.clip.embed_dim})")

    @classmethod
    def tiny(cls, **changes) -> "PHPConfig":
        """A CPU-sized model for tests and the demo: same structure, small dimensions."""
        clip = ClipConfig(
            embed_dim=32,
            vision_width=48,
            vision_layers=2,
            vision_heads=2,
            patch_size=8,
            stride=8,
            image_size=(48, 24),
            text_width=32,
            text_heads=2,
            text_layers=2,
        )
        base = cls(clip=clip, cnum=3, num_experts=4, topk=2, reduction=4, efp_layers=2, efp_heads=2)
        return replace(base, **changes)


# The CLIP backbones a config can name (``model.clip`` in a spec, the released checkpoints' widths): the one
# table of named architectures, read by the spec schema, the config builder, the importer and the run folder.
CLIP_PRESETS: dict[str, ClipConfig] = {"ViT-B/16": ClipConfig(), "tiny": PHPConfig.tiny().clip}
