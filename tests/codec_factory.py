"""Small codec configurations shared by the tests (random weights, fast on CPU)."""


def tiny_mambaic_config():
    """The MambaIC architecture (VSS stages, window attention, slice context) at CPU-test width."""
    from effvision.codecs.mambaic import MambaICConfig

    return MambaICConfig(
        transform_channels=16,
        latent_channels=20,
        hyper_channels=8,
        depths=(0, 1, 1, 1),
        attention_dim=8,
        head_dim=8,
        context_hidden=(8, 8),
        context_depth=1,
        d_state=4,
        ssm_ratio=1.0,
        drop_path_rate=0.0,
        name="test-tiny",
    )


def image_size_factorized_prior(channels: int = 16, latent_channels: int = 24):
    """compressai's FactorizedPrior (random weights) with the image-size ``shape`` contract effvision's
    codecs follow: it pads to a multiple of 16 itself and crops back, so any image size codes."""
    import torch.nn.functional as F
    from compressai.models import FactorizedPrior

    class ImageSizeFactorizedPrior(FactorizedPrior):
        def compress(self, x):
            height, width = x.shape[-2:]
            padded = F.pad(x, (0, -width % 16, 0, -height % 16), mode="replicate")
            return {"strings": super().compress(padded)["strings"], "shape": (height, width)}

        def decompress(self, strings, shape):
            height, width = shape
            x_hat = super().decompress(strings, (-(-height // 16), -(-width // 16)))["x_hat"]
            return {"x_hat": x_hat[..., :height, :width].clamp(0, 1)}

    return ImageSizeFactorizedPrior(N=channels, M=latent_channels)
