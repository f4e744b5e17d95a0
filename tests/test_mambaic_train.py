"""MambaIC training: the loss goes down, resume continues, DDP (gloo, 2 CPU processes) stays in sync."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from effvision.codecs.mambaic import MambaIC
from effvision.codecs.mambaic.train import TrainSettings, random_crops, rate_distortion_loss, train
from tests.codec_factory import tiny_mambaic_config

torch.set_num_threads(1)

TINY = tiny_mambaic_config()


def _images(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    # smooth images (a low-resolution random field upsampled) are learnable in a few steps
    return [
        torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size=(80, 80), mode="bilinear")[0]
        for _ in range(count)
    ]


def test_a_few_steps_on_tiny_crops_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = MambaIC(TINY)
    x = random_crops(_images(), 4, 64, torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        before = float(rate_distortion_loss(model(x), x, 0.013)["loss"])
    train(model, _images(), TrainSettings(steps=12, batch_size=4, crop=64, lr=2e-3, progress=False))
    model.eval()
    with torch.no_grad():
        after = float(rate_distortion_loss(model(x), x, 0.013)["loss"])
    assert after < before


def test_rate_distortion_loss_is_lambda_mse_plus_bpp() -> None:
    x = torch.zeros(1, 3, 4, 4)
    output = {"x_hat": x + 0.5, "likelihoods": {"y": torch.full((1, 2, 2, 2), 0.5)}}
    losses = rate_distortion_loss(output, x, lmbda=0.01)
    assert torch.isclose(losses["bpp"], torch.tensor(8 / 16))
    assert torch.isclose(losses["loss"], torch.tensor(0.01 * 255**2 * 0.25 + 0.5))


def test_resume_continues_from_the_saved_step(tmp_path: Path) -> None:
    settings = TrainSettings(steps=2, batch_size=1, crop=64, progress=False, save_every=1)
    train(MambaIC(TINY), _images(1), settings, out_dir=tmp_path)
    settings.steps = 3
    history = train(MambaIC(TINY), _images(1), settings, out_dir=tmp_path, resume=True)
    assert [record["step"] for record in history] == [3]
    assert (tmp_path / "model.safetensors").is_file()


def _nan_lr(state):
    state["optimizer"]["param_groups"][0]["lr"] = float("nan")


def _nan_weight(state):
    name = next(key for key, value in state["model"].items() if value.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))


@pytest.mark.parametrize(("craft", "message"), [
    (_nan_lr, "learning rate / betas"),  # trained every step on NaN and failed only at the save
    (_nan_weight, "is not finite"),
    (lambda state: state.update(step=-5), "is not an integer >= 0"),  # ran 8 steps instead of 3
    (lambda state: state.update(step=float("nan")), "is not an integer >= 0"),
    (lambda state: state.pop("optimizer"), r"is not a training state of this run \(KeyError"),
    (lambda state: state.update(model={f"extra.{i}": torch.zeros(1) for i in range(100_000)}),
     # an 8.9 MB message listed every key; now the pickle scan refuses its 2.1 million opcodes first
     r"is not a training state of this run \(RuntimeError|its pickle has more than 2097152 opcodes"),
])
def test_a_crafted_training_state_is_one_clear_error(tmp_path: Path, craft, message) -> None:
    from effvision.errors import UserError

    settings = TrainSettings(steps=1, batch_size=1, crop=64, progress=False, save_every=1)
    train(MambaIC(TINY), _images(1), settings, out_dir=tmp_path)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    craft(state)
    torch.save(state, tmp_path / "train_state.pt")
    settings.steps = 3
    with pytest.raises(UserError, match=message) as error:
        train(MambaIC(TINY), _images(1), settings, out_dir=tmp_path, resume=True)
    assert str(tmp_path / "train_state.pt") in str(error.value) and len(str(error.value)) < 600


def test_time_limit_stops_after_the_current_step_and_saves_it(tmp_path: Path) -> None:
    settings = TrainSettings(steps=50, batch_size=1, crop=64, progress=False, save_every=100, max_seconds=0.0)
    history = train(MambaIC(TINY), _images(1), settings, out_dir=tmp_path)
    assert [record["step"] for record in history] == [1]
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 1


def test_resume_reads_a_state_file_with_the_original_keys(tmp_path: Path) -> None:
    model = MambaIC(TINY)
    settings = TrainSettings(steps=2, batch_size=1, crop=64, progress=False)
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": torch.optim.Adam(main, lr=settings.lr).state_dict(),
            "aux_optimizer": torch.optim.Adam(aux, lr=settings.aux_lr).state_dict(),
            "step": 1,
        },
        tmp_path / "train_state.pt",
    )
    history = train(MambaIC(TINY), _images(1), settings, out_dir=tmp_path, resume=True)
    assert [record["step"] for record in history] == [2]
    assert set(torch.load(tmp_path / "train_state.pt", weights_only=True)) == {
        "model", "optimizer", "aux_optimizer", "step", "settings"  # the settings a resume must share (stored since)
    }


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on both ranks, as DDP expects
    model = MambaIC(TINY)
    train(model, _images(), TrainSettings(steps=2, batch_size=1, crop=64, progress=False, seed=0))
    torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_with_two_gloo_processes_keeps_replicas_identical(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    first = torch.load(tmp_path / "rank0.pt", weights_only=True)
    second = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = MambaIC(TINY).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["g_a.0.weight"], initial["g_a.0.weight"])


def test_final_lr_decays_the_learning_rate_on_a_half_cosine(monkeypatch) -> None:
    seen: list[float] = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        if len(self.param_groups[0]["params"]) > 1:  # the main optimizer, not the quantiles' aux one
            seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    torch.manual_seed(0)
    settings = TrainSettings(steps=5, batch_size=2, crop=64, lr=1e-3, final_lr=1e-5, progress=False)
    train(MambaIC(TINY), _images(), settings)
    expected = [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * s / 5)) for s in range(5)]
    assert seen == pytest.approx(expected, rel=1e-12)
