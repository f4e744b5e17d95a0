"""effvision.training: atomic resumable state, time limit, ranks that agree, rank-0 progress, cosine schedule."""

from __future__ import annotations

import ast
import errno
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from effvision.errors import UserError
from effvision.training import (
    Distributed,
    TimeLimit,
    cosine_factor,
    cosine_lr,
    load_training_state,
    progress_bar,
    restore,
    resume_training_state,
    save_training_state,
    state_dicts,
)

torch.set_num_threads(1)


def _parts(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=1e-2)}


def _one_step(parts: dict) -> None:
    loss = parts["model"](torch.randn(5, 4)).square().mean()
    parts["optimizer"].zero_grad()
    loss.backward()
    parts["optimizer"].step()


def test_saved_state_loads_back_and_no_temp_file_is_left(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "state.pt"
    state = {"weights": torch.randn(3, 2), "step": 7, "history": [{"loss": 0.5}]}
    save_training_state(path, state)
    loaded = load_training_state(path)
    assert torch.equal(loaded["weights"], state["weights"])
    assert loaded["step"] == 7 and loaded["history"] == [{"loss": 0.5}]
    assert os.listdir(path.parent) == ["state.pt"]


def test_a_write_that_fails_half_way_leaves_the_previous_state_and_no_temp_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "state.pt"
    save_training_state(path, {"step": 1})
    before = path.read_bytes()
    written = []

    def disk_full(obj, target) -> None:
        Path(target).write_bytes(b"PK\x03\x04 half of a zip")
        written.append(target)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="state.pt"):
        save_training_state(path, {"step": 2})
    assert written and Path(written[0]).parent == tmp_path  # the partial bytes went to a temp file beside it
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.pt"]


def test_a_state_that_cannot_be_pickled_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    with pytest.raises(Exception, match="pickle|lambda"):
        save_training_state(path, {"weights": torch.zeros(1000), "hook": lambda: None})
    assert os.listdir(tmp_path) == []


def test_resume_restores_every_part_at_the_saved_step(tmp_path: Path) -> None:
    trained = _parts(seed=0)
    for _ in range(3):
        _one_step(trained)
    save_training_state(tmp_path / "state.pt", state_dicts(trained, step=3))

    fresh = _parts(seed=1)
    state = resume_training_state(tmp_path / "state.pt", fresh)
    assert state["step"] == 3
    for name, tensor in trained["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[name], tensor)
    moments = [s["exp_avg"] for s in fresh["optimizer"].state_dict()["state"].values()]
    expected = [s["exp_avg"] for s in trained["optimizer"].state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, expected, strict=True))
    assert fresh["optimizer"].state_dict()["state"][0]["step"] == 3


def test_resuming_continues_exactly_like_the_uninterrupted_run(tmp_path: Path) -> None:
    inputs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def step(parts: dict, x: torch.Tensor) -> None:
        parts["optimizer"].zero_grad()
        parts["model"](x).square().mean().backward()
        parts["optimizer"].step()

    straight = _parts(seed=0)
    for x in inputs:
        step(straight, x)
    interrupted = _parts(seed=0)
    for x in inputs[:2]:
        step(interrupted, x)
    save_training_state(tmp_path / "state.pt", state_dicts(interrupted, step=2))
    resumed = _parts(seed=5)
    start = resume_training_state(tmp_path / "state.pt", resumed)["step"]
    for x in inputs[start:]:
        step(resumed, x)
    for name, tensor in straight["model"].state_dict().items():
        assert torch.equal(resumed["model"].state_dict()[name], tensor)


def test_without_a_state_file_resume_returns_none_and_touches_nothing(tmp_path: Path) -> None:
    parts = _parts(seed=0)
    weight = parts["model"].weight.detach().clone()
    assert resume_training_state(tmp_path / "missing.pt", parts) is None
    assert resume_training_state(None, parts) is None
    assert torch.equal(parts["model"].weight, weight)


def test_restore_skips_only_optional_parts_the_state_lacks() -> None:
    saved = _parts(seed=0)
    state = state_dicts({"model": saved["model"]}, step=1)
    target = _parts(seed=1)
    restore(state, target, optional=["optimizer"])
    assert torch.equal(target["model"].weight, saved["model"].weight)
    with pytest.raises(KeyError, match="optimizer"):
        restore(state, _parts(seed=2))


def test_time_limit_expires_only_after_its_seconds() -> None:
    now = [100.0]
    limit = TimeLimit(10.0, clock=lambda: now[0])
    now[0] = 110.0
    assert not limit.expired() and limit.elapsed() == 10.0
    now[0] = 110.5
    assert limit.expired()
    assert not TimeLimit(None, clock=lambda: now[0] + 1e9).expired()


def test_a_single_process_needs_no_process_group(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed = Distributed.from_environment("cpu")
    model = torch.nn.Linear(2, 2)
    assert (distributed.rank, distributed.world_size, distributed.main, distributed.enabled) == (0, 1, True, False)
    assert distributed.wrap(model) is model
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.sum([1.0, 2.5]) == [1.0, 2.5]
    assert not torch.distributed.is_initialized()


def _agreement_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    distributed = Distributed.from_environment("cpu")
    answers = {
        "rank": distributed.rank,
        "stop": distributed.any_rank(rank == 1),  # only rank 1 ran out of time
        "keep_going": distributed.any_rank(False),
        "sum": distributed.sum([1.0, float(rank)]),
    }
    distributed.close()
    answers["closed"] = not torch.distributed.is_initialized()
    torch.save(answers, Path(out_dir) / f"rank{rank}.pt")


def test_two_gloo_processes_agree_to_stop_when_one_runs_out_of_time(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_agreement_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        answers = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert answers == {"rank": rank, "stop": True, "keep_going": False, "sum": [2.0, 1.0], "closed": True}


def test_progress_bar_shows_on_rank_zero_only(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    assert not progress_bar(range(3)).disable
    assert progress_bar(range(3), show=False).disable
    monkeypatch.setenv("RANK", "1")
    assert progress_bar(range(3)).disable
    assert list(progress_bar(range(3))) == [0, 1, 2]


@pytest.mark.parametrize(
    "step,total,warmup,expected",
    [
        (0, 10, 0, 1.0),
        (5, 10, 0, 0.5),
        (10, 10, 0, 0.0),
        (15, 10, 0, 0.0),
        (0, 10, 4, 0.25),
        (3, 10, 4, 1.0),
        (4, 10, 4, 1.0),
        (7, 10, 4, 0.5),
        (8, 12, 4, 0.5),
        (1, 8, 0, 0.5 * (1 + math.cos(math.pi / 8))),
    ],
)
def test_cosine_factor_warms_up_linearly_then_follows_a_half_cosine(step, total, warmup, expected) -> None:
    assert cosine_factor(step, total, warmup) == pytest.approx(expected, abs=1e-12)


def test_cosine_lr_runs_from_start_to_end() -> None:
    assert cosine_lr(0, 100, 1e-3, 1e-5) == pytest.approx(1e-3, abs=1e-15)
    assert cosine_lr(50, 100, 1e-3, 1e-5) == pytest.approx((1e-3 + 1e-5) / 2, abs=1e-15)
    assert cosine_lr(100, 100, 1e-3, 1e-5) == pytest.approx(1e-5, abs=1e-15)
    assert cosine_lr(250, 100, 1e-3, 1e-5) == pytest.approx(1e-5, abs=1e-15)


def test_the_training_module_does_not_import_the_cli() -> None:
    code = "import sys, effvision.training; print(sorted(m for m in sys.modules if m.startswith('effvision.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ast.literal_eval(result.stdout) == ["effvision.errors", "effvision.io_utils", "effvision.training"]


def test_progress_is_rank_zeros_and_sparse_when_stderr_is_no_terminal(monkeypatch):
    """Not on a terminal, tqdm wrote two carriage-return updates a step into the log; under torchrun, rank 1's
    command also printed "wrote ..." lines."""
    from effvision.training import process_rank, progress_bar

    monkeypatch.setenv("RANK", "1")
    assert process_rank() == 1
    assert progress_bar(range(3)).disable
    monkeypatch.setenv("RANK", "0")
    bar = progress_bar(range(3))  # pytest's stderr is no terminal
    assert not bar.disable and bar.mininterval == 30.0
    bar.close()
