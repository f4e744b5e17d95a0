"""A reduced model through the code paths of timm's train.py (--model-ema --grad-checkpointing) and validate.py.

timm's train.py / validate.py are not in the pip package and tests run without network, so this test
drives the same library calls those scripts make, in their order: ``create_model`` with the script's
kwargs, ``set_grad_checkpointing``, ``resolve_data_config`` + ``create_dataset`` + ``create_loader`` on an
ImageFolder, ``create_optimizer_v2`` / ``create_scheduler_v2``, ``ModelEmaV3`` (a deepcopy of the model,
updated every step), ``CheckpointSaver`` (pickling the model's arguments and state), then the validate.py
loop (``accuracy``, ``AverageMeter``) on the model and its EMA.
"""

import numpy as np
import timm
import timm.data
import timm.loss
import timm.optim
import timm.scheduler
import timm.utils
import torch
from PIL import Image

import effvision  # noqa: F401  (registers the names)


def make_image_folder(root, classes=2, per_class=4, size=72):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                pixels[..., label] = 255  # a learnable colour cue
                Image.fromarray(pixels).save(folder / f"{index}.png")


def loader(root, split, model, is_training):
    config = timm.data.resolve_data_config({"input_size": (3, 64, 64)}, model=model)  # train.py --input-size
    dataset = timm.data.create_dataset("", root=str(root / split), split=split, is_training=is_training)
    return timm.data.create_loader(
        dataset, input_size=config["input_size"], batch_size=4, is_training=is_training, use_prefetcher=False,
        interpolation=config["interpolation"], mean=config["mean"], std=config["std"], num_workers=0,
        crop_pct=config["crop_pct"], device=torch.device("cpu"),
    )


def validate(model, data):
    top1 = timm.utils.AverageMeter()
    model.eval()
    with torch.no_grad():
        for images, target in data:
            acc1, _ = timm.utils.accuracy(model(images), target, topk=(1, 2))
            top1.update(acc1.item(), images.size(0))
    return top1.avg


def test_train_with_ema_and_grad_checkpointing_then_validate(tmp_path):
    make_image_folder(tmp_path)
    torch.manual_seed(0)
    model = timm.create_model("ppt_deit_tiny_patch16_224", num_classes=2, img_size=64, depth=4, drop_path_rate=0.1)
    model.set_grad_checkpointing(enable=True)
    ema = timm.utils.ModelEmaV3(model, decay=0.9)
    assert ema.module.blocks.grad_checkpointing and ema.module is not model
    train_data = loader(tmp_path, "train", model, is_training=True)
    val_data = loader(tmp_path, "val", model, is_training=False)
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    scheduler, epochs = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, warmup_epochs=0)
    loss_fn = timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)
    (tmp_path / "out").mkdir()  # train.py creates its output folder
    saver = timm.utils.CheckpointSaver(model, optimizer, model_ema=ema, checkpoint_dir=str(tmp_path / "out"),
                                       recovery_dir=str(tmp_path / "out"), max_history=1)

    before = {name: p.detach().clone() for name, p in ema.module.named_parameters()}
    step = 0
    for epoch in range(epochs):
        model.train()
        for images, target in train_data:
            loss = loss_fn(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            ema.update(model, step=step)
            assert torch.isfinite(loss)
        scheduler.step(epoch + 1)
        top1 = validate(model, val_data)
        saver.save_checkpoint(epoch, metric=top1)

    assert model.blocks.grad_checkpointing and ema.module.blocks.grad_checkpointing
    assert any(not torch.equal(p, before[name]) for name, p in ema.module.named_parameters())
    assert 0.0 <= validate(ema.module, val_data) <= 100.0
    checkpoint = torch.load(tmp_path / "out" / "last.pth.tar", weights_only=False)
    restored = timm.create_model("ppt_deit_tiny_patch16_224", num_classes=2, img_size=64, depth=4)
    restored.load_state_dict(checkpoint["state_dict"])
    images = next(iter(val_data))[0]
    model.eval()
    with torch.no_grad():
        assert torch.equal(restored.eval()(images), model(images))
