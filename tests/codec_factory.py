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
