"""PIL image <-> ``.evc`` container through an :class:`~effvision.codecs.base.ImageCodec`.

Codecs see RGB only. Grayscale images are replicated to RGB and converted back after decoding; an
alpha channel is stored losslessly (zlib) in its own section; other PIL modes are converted to the
nearest of RGB, L, RGBA, LA first. The image is edge-padded to the codec's alignment and the padding
is recorded, so the decoder crops back to the original size.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from effvision.codecs.base import ImageCodec
from effvision.codecs.container import MAX_PADDING, Container, ContainerError, Mode, Section, SectionKind
from effvision.errors import UserError

# Largest padded image a codec is asked to process: 3 x 2**26 float32 is 768 MiB before any activation.
MAX_PIXELS = 1 << 26

_STORED_MODE = {"RGB": "RGB", "L": "L", "RGBA": "RGBA", "LA": "LA", "1": "L", "I": "L", "I;16": "L", "F": "L"}


def _normalize_mode(image: Image.Image) -> Image.Image:
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "I;16", "F"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping (PIL's convert("L") clips).
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size and array.max() > 255 else 255
        return Image.fromarray(np.clip(array / high * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert(_STORED_MODE.get(image.mode, "RGB"))


def _check_pixels(height: int, width: int) -> None:
    if height * width > MAX_PIXELS:
        raise UserError(f"image of {width}x{height} pixels exceeds the {MAX_PIXELS}-pixel limit")


def encode_image(codec: ImageCodec, image: Image.Image) -> Container:
    """Encode a PIL image of any mode into a container."""
    image = _normalize_mode(image)
    width, height = image.size
    if codec.alignment > MAX_PADDING + 1:
        raise ValueError(f"codec alignment {codec.alignment} exceeds {MAX_PADDING + 1}")
    pad_right, pad_bottom = -width % codec.alignment, -height % codec.alignment
    _check_pixels(height + pad_bottom, width + pad_right)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255)
    if pad_right or pad_bottom:
        tensor = F.pad(tensor.unsqueeze(0), (0, pad_right, 0, pad_bottom), mode="replicate")[0]
    sections = [Section(data) for data in codec.encode(tensor)]
    if image.mode in ("RGBA", "LA"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.uint8)
        sections.append(Section(zlib.compress(alpha.tobytes(), 9), SectionKind.ALPHA))
    return Container(
        codec=codec.name,
        config_id=codec.config_id,
        fingerprint=codec.fingerprint(),
        width=width,
        height=height,
        mode=Mode[image.mode],
        sections=tuple(sections),
        pad_right=pad_right,
        pad_bottom=pad_bottom,
    )


def _decode_alpha(data: bytes, height: int, width: int) -> Image.Image:
    inflater = zlib.decompressobj()
    try:
        # max_length bounds the output, so a zlib bomb cannot allocate more than one plane.
        plane = inflater.decompress(data, height * width + 1)
    except zlib.error as error:
        raise ContainerError(f"corrupt alpha section ({error})") from error
    if len(plane) != height * width or inflater.unconsumed_tail or not inflater.eof:
        raise ContainerError("corrupt alpha section: wrong size")
    return Image.frombytes("L", (width, height), plane)


def decode_image(container: Container, codec: ImageCodec) -> Image.Image:
    """Decode a container with the codec that wrote it, back to the original size and mode."""
    if (codec.name, codec.config_id) != (container.codec, container.config_id):
        raise UserError(
            f"file needs codec {container.codec}/{container.config_id}, got {codec.name}/{codec.config_id}"
        )
    if codec.fingerprint() != container.fingerprint:
        raise UserError(
            f"file was written by different {container.codec}/{container.config_id} weights "
            "(fingerprint mismatch); pass the checkpoint it was encoded with"
        )
    padded_h, padded_w = container.height + container.pad_bottom, container.width + container.pad_right
    if padded_h % codec.alignment or padded_w % codec.alignment:
        raise ContainerError(f"padded size {padded_w}x{padded_h} is not a multiple of {codec.alignment}")
    _check_pixels(padded_h, padded_w)
    alpha = None
    if container.mode in (Mode.RGBA, Mode.LA):
        if container.alpha is None:
            raise ContainerError(f"mode {container.mode.name} but no alpha section")
        alpha = _decode_alpha(container.alpha, container.height, container.width)
    tensor = codec.decode(container.codec_sections, padded_h, padded_w)
    if tuple(tensor.shape) != (3, padded_h, padded_w):
        raise UserError(f"codec returned shape {tuple(tensor.shape)}, expected {(3, padded_h, padded_w)}")
    pixels = tensor[:, : container.height, : container.width].clamp(0, 1).mul(255).round().to(torch.uint8)
    image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")
    if container.mode in (Mode.L, Mode.LA):
        image = image.convert("L")
    if alpha is not None:
        image.putalpha(alpha)
    return image
