"""VQGAN configurations.

``IMAGENET_F16_16384`` is the taming-transformers ``vqgan_imagenet_f16_16384`` model (Esser et al., CVPR 2021)
used by Mao et al. (DCC 2024); its ``.ckpt`` state dict loads into :class:`~effvision.codecs.vqgan.taming.VQModel`.
``SMALL_F16`` is a CPU-sized model with the same downsampling factor (16) used for tests and the shipped demo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from effvision.bounded_config import Limit


@dataclass(frozen=True)
class VQGANConfig:
    """Hyper-parameters of a taming-transformers VQModel (names follow taming's ``ddconfig``).

    Attributes:
        ch: base channel count; every level has ``ch * ch_mult[level]`` channels (multiples of 32 for GroupNorm).
        ch_mult: channel multiplier per resolution level; ``len(ch_mult) - 1`` downsamplings (5 levels -> f=16).
        num_res_blocks: residual blocks per encoder level (the decoder uses one more).
        attn_resolutions: feature-map sizes (relative to ``resolution``) that get a self-attention block.
        resolution: nominal training resolution; only used to place attention blocks.
        z_channels: channels of the encoder output / decoder input.
        embed_dim: codebook vector dimension.
        n_embed: codebook size.
        in_channels / out_ch: image channels.
        dropout: dropout inside residual blocks.
        norm_groups: GroupNorm groups (taming: 32). A 32-channel model needs fewer: with one channel per
            group every norm becomes an instance norm and the decoder cannot carry a crop's mean colour.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 16384
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    norm_groups: int = 32
    name: str = field(default="custom", compare=False)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> VQGANConfig:
        values = dict(values)
        for key in ("ch_mult", "attn_resolutions"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


IMAGENET_F16_16384 = VQGANConfig(name="imagenet-f16-16384")

SMALL_F16 = VQGANConfig(
    ch=32,
    ch_mult=(1, 1, 2, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    resolution=64,
    z_channels=64,
    embed_dim=32,
    n_embed=1024,
    norm_groups=8,
    name="small-f16-1024",
)

CONFIGS: dict[str, VQGANConfig] = {c.name: c for c in (IMAGENET_F16_16384, SMALL_F16)}

#: what a codec file's ``vqgan_config`` may ask for (read_config_fields); ImageNet f16-16384 is well inside
CONFIG_LIMITS: dict[str, Limit] = {
    "ch": Limit(1, 1024),
    "ch_mult": Limit(1, 16, "ints", 1, 8),
    "num_res_blocks": Limit(0, 16),
    "attn_resolutions": Limit(1, 65536, "ints", 0, 8),
    "resolution": Limit(1, 65536),
    "z_channels": Limit(1, 4096),
    "embed_dim": Limit(1, 4096),
    "n_embed": Limit(1, 65536),
    "in_channels": Limit(3, 3),  # the codec codes RGB
    "out_ch": Limit(3, 3),
    "dropout": Limit(0, 0.99, "float"),
    "norm_groups": Limit(1, 1024),
    "name": Limit(0, 64, "str"),
}
