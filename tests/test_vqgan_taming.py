"""The VQGAN modules follow the taming-transformers VQModel layout and math (Esser et al., CVPR 2021)."""

import math

import pytest
import torch

from effvision.codecs.vqgan.config import IMAGENET_F16_16384, SMALL_F16, VQGANConfig
from effvision.codecs.vqgan.model import VQGANCodec
from effvision.codecs.vqgan.taming import AttnBlock, Downsample, VQModel

TINY = VQGANConfig(ch=32, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(2,), resolution=32,
                   z_channels=32, embed_dim=8, n_embed=64, name="tiny")


def _resnet(prefix: str, c_in: int, c_out: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
              f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
              f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
              f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,)}
    if c_in != c_out:
        shapes.update({f"{prefix}.nin_shortcut.weight": (c_out, c_in, 1, 1), f"{prefix}.nin_shortcut.bias": (c_out,)})
    return shapes


def _attention(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        shapes.update({f"{prefix}.{name}.weight": (c, c, 1, 1), f"{prefix}.{name}.bias": (c,)})
    return shapes


def _conv(prefix: str, c_out: int, c_in: int, size: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c_out, c_in, size, size), f"{prefix}.bias": (c_out,)}


def taming_shapes(c: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of taming's VQModel (minus loss.*), enumerated from its constructor's rules."""
    shapes = _conv("encoder.conv_in", c.ch, c.in_channels, 3)
    levels = len(c.ch_mult)
    resolution, block_in = c.resolution, c.ch
    for i, mult in enumerate(c.ch_mult):
        for j in range(c.num_res_blocks):
            shapes.update(_resnet(f"encoder.down.{i}.block.{j}", block_in, c.ch * mult))
            block_in = c.ch * mult
            if resolution in c.attn_resolutions:
                shapes.update(_attention(f"encoder.down.{i}.attn.{j}", block_in))
        if i != levels - 1:
            shapes.update(_conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3))
            resolution //= 2
    for side in ("encoder", "decoder"):
        top = c.ch * c.ch_mult[-1]
        shapes.update(_resnet(f"{side}.mid.block_1", top, top))
        shapes.update(_attention(f"{side}.mid.attn_1", top))
        shapes.update(_resnet(f"{side}.mid.block_2", top, top))
    shapes.update({"encoder.norm_out.weight": (block_in,), "encoder.norm_out.bias": (block_in,)})
    shapes.update(_conv("encoder.conv_out", c.z_channels, block_in, 3))
    block_in = c.ch * c.ch_mult[-1]
    shapes.update(_conv("decoder.conv_in", block_in, c.z_channels, 3))
    for i in reversed(range(levels)):
        for j in range(c.num_res_blocks + 1):
            shapes.update(_resnet(f"decoder.up.{i}.block.{j}", block_in, c.ch * c.ch_mult[i]))
            block_in = c.ch * c.ch_mult[i]
            if resolution in c.attn_resolutions:
                shapes.update(_attention(f"decoder.up.{i}.attn.{j}", block_in))
        if i != 0:
            shapes.update(_conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3))
            resolution *= 2
    shapes.update({"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,)})
    shapes.update(_conv("decoder.conv_out", c.out_ch, block_in, 3))
    shapes["quantize.embedding.weight"] = (c.n_embed, c.embed_dim)
    shapes.update(_conv("quant_conv", c.embed_dim, c.z_channels, 1))
    shapes.update(_conv("post_quant_conv", c.z_channels, c.embed_dim, 1))
    return shapes


@pytest.mark.parametrize("config", [TINY, SMALL_F16], ids=lambda c: c.name)
def test_state_dict_keys_and_shapes_match_taming(config):
    model = VQModel(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == taming_shapes(config)


def test_imagenet_f16_16384_layout_matches_taming_on_meta_device():
    with torch.device("meta"):
        model = VQModel(IMAGENET_F16_16384)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == taming_shapes(IMAGENET_F16_16384)
    # spot checks of the released checkpoint's tensors
    assert shapes["quantize.embedding.weight"] == (16384, 256)
    assert shapes["encoder.down.4.attn.1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.up.4.attn.2.q.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (128, 128, 3, 3)
    assert "encoder.down.4.downsample.conv.weight" not in shapes and "decoder.up.0.upsample.conv.weight" not in shapes


def test_taming_checkpoint_loads_ignoring_loss_keys_and_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    state = {k: torch.randn(shape) * 0.05 for k, shape in taming_shapes(TINY).items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "last.ckpt")
    codec = VQGANCodec(TINY)
    codec.load_taming_checkpoint(tmp_path / "last.ckpt")
    direct = VQModel(TINY)
    direct.load_state_dict({k: v for k, v in state.items() if not k.startswith("loss.")})
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(codec.vq(x)[0], direct(x)[0])
        assert torch.equal(codec.vq.encode_indices(x), direct.encode_indices(x))


def test_checkpoint_of_another_config_is_a_clear_error(tmp_path):
    torch.save({"state_dict": VQModel(TINY).state_dict()}, tmp_path / "tiny.ckpt")
    with pytest.raises(ValueError, match="does not match VQGAN config"):
        VQGANCodec(SMALL_F16).load_taming_checkpoint(tmp_path / "tiny.ckpt")


def test_attention_is_taming_single_head_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, N)
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=2)  # (B, N_query, N_key)
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(x.shape))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_downsample_pads_right_and_bottom_before_the_stride_two_conv():
    block = Downsample(32)
    x = torch.randn(1, 32, 8, 8)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), block.conv.weight,
                                          block.conv.bias, stride=2)
    assert torch.equal(block(x), expected)
    assert block(x).shape[-2:] == (4, 4)


def test_quantizer_picks_the_nearest_codebook_entry():
    model = VQModel(TINY)
    codebook = model.quantize.embedding.weight.detach()
    chosen = torch.randint(0, TINY.n_embed, (2, 3, 4))
    z = codebook[chosen].permute(0, 3, 1, 2) + 1e-6
    assert torch.equal(model.quantize.nearest_indices(z), chosen)
