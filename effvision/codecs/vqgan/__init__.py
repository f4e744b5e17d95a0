"""VQGAN extreme-compression codec (Mao et al., DCC 2024, arXiv 2307.08265).

Heavy modules (torch, compressai) are imported by the submodules only; import
:class:`effvision.codecs.vqgan.model.VQGANCodec` where it is needed.
"""
