"""Token reduction for timm Vision Transformers."""
