"""Fine-tuning timm / effvision models on ImageFolder data (single process or torchrun + DDP)."""
