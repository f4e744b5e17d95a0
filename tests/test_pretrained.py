"""Official weights (``--pretrained``): fetched through huggingface_hub, checksum-verified, converted once,
loaded without running code from the file. No network: ``hf_hub_download`` is replaced by a fake hub
that serves tiny checkpoints in the official layouts from a local folder, through the real code path."""

import argparse
import hashlib
import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from effvision import cli
from effvision.codecs import pretrained
from effvision.codecs.adapters import load_mambaic, load_vqgan
from effvision.codecs.container import parse
from effvision.codecs.mambaic import MambaIC
from effvision.codecs.mambaic.checkpoint import from_official_state_dict, to_official_state_dict
from effvision.codecs.pretrained import PretrainedWeights, fetch_pretrained
from effvision.codecs.vqgan.config import VQGANConfig
from effvision.codecs.vqgan.index_coding import FIXED_LENGTH
from effvision.codecs.vqgan.taming import VQModel
from effvision.errors import UserError
from effvision.torch_checkpoint import InertObject, load_torch_checkpoint
from tests.codec_factory import tiny_mambaic_config

TINY_VQGAN = VQGANConfig(ch=32, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(2,), resolution=32,
                         z_channels=32, embed_dim=8, n_embed=64, name="tiny")

MAMBAIC = PretrainedWeights(
    config_id="test-official-mambaic", codec="mambaic", description="tiny MambaIC release",
    filename="checkpoint0.025.pth.tar", repo_id="authors/tiny-mambaic", revision=None, sha256=None,
    architecture=tiny_mambaic_config(), official_url="https://example.org/mambaic", license="test",
)
VQGAN = PretrainedWeights(
    config_id="test-taming", codec="vqgan", description="tiny taming VQGAN", filename="last.ckpt",
    repo_id="authors/tiny-taming", revision=None, sha256=None, architecture=TINY_VQGAN,
    official_url="https://example.org/taming", license="test",
)


class Evil:
    """Unpickling this runs ``os.system``, unless the unpickler refuses it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def mambaic_release(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = MambaIC(tiny_mambaic_config())
    return {"epoch": 3, "state_dict": to_official_state_dict(model), "loss": torch.tensor(0.5)}


@pytest.fixture()
def lightning_module(monkeypatch):
    """A stand-in ``pytorch_lightning.callbacks`` module, importable only while a checkpoint is saved."""
    module = types.ModuleType("pytorch_lightning.callbacks")
    callback = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks"})
    module.ModelCheckpoint = callback
    monkeypatch.setitem(sys.modules, "pytorch_lightning", types.ModuleType("pytorch_lightning"))
    monkeypatch.setitem(sys.modules, "pytorch_lightning.callbacks", module)
    return callback


def taming_release(callback_class, seed: int = 0) -> dict:
    """A Lightning checkpoint as taming-transformers writes it: callbacks keyed by the callback class,
    hyper-parameters as an argparse Namespace, a numpy scalar, discriminator weights under ``loss.``."""
    torch.manual_seed(seed)
    state = VQModel(TINY_VQGAN).state_dict()
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    return {
        "epoch": 7,
        "global_step": 1000,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state,
        "callbacks": {callback_class: {"best_model_score": np.float64(0.25), "best_model_path": "x.ckpt"}},
        "hparams": argparse.Namespace(base_learning_rate=4.5e-6),
        "optimizer_states": [],
    }


REAL_HUB_UNREACHABLE = pretrained.hub_unreachable


class FakeHub:
    """``hf_hub_download`` over a local folder: files are "downloaded" into a local cache on first use."""

    def __init__(self, root):
        self.root = root
        self.calls: list[dict] = []
        self.downloaded: set[tuple[str, str]] = set()

    def publish(self, repo: str, filename: str, payload) -> None:
        path = self.root / "hub" / repo / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(payload, bytes):
            path.write_bytes(payload)
        else:
            torch.save(payload, path)

    def __call__(self, repo_id, filename, revision=None, local_files_only=False):
        from huggingface_hub.errors import LocalEntryNotFoundError

        self.calls.append({"repo_id": repo_id, "filename": filename, "local_files_only": local_files_only})
        path = self.root / "hub" / repo_id / filename
        if local_files_only and (repo_id, filename) not in self.downloaded:
            raise LocalEntryNotFoundError("not in the local cache")
        if not path.is_file():
            raise FileNotFoundError(f"{repo_id}/{filename} does not exist")
        self.downloaded.add((repo_id, filename))
        return str(path)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    import huggingface_hub

    fake = FakeHub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setenv("EFFVISION_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EFFVISION_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "PRETRAINED", {MAMBAIC.config_id: MAMBAIC, VQGAN.config_id: VQGAN})
    monkeypatch.setattr(pretrained, "hub_unreachable", lambda: None)  # the fake hub is always "reachable"
    return fake


@pytest.fixture()
def conversions(monkeypatch):
    calls = []
    convert = pretrained._convert

    def counting(entry, source, destination):
        calls.append(entry.config_id)
        convert(entry, source, destination)

    monkeypatch.setattr(pretrained, "_convert", counting)
    return calls


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_first_use_downloads_converts_and_records_the_source_checksum(hub, tmp_path):
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    converted = fetch_pretrained("test-official-mambaic")
    record = json.loads((tmp_path / "cache/mambaic/test-official-mambaic.json").read_text())
    assert converted == tmp_path / "cache/mambaic/test-official-mambaic.safetensors"
    assert record["source_sha256"] == sha256(tmp_path / "hub/authors/tiny-mambaic/checkpoint0.025.pth.tar")
    assert record["converted_sha256"] == sha256(converted)
    assert record["trust"] == "first-use"
    assert record["source"] == "hf://authors/tiny-mambaic/checkpoint0.025.pth.tar@main"


def test_converted_weights_equal_the_official_ones(hub):
    release = mambaic_release()
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", release)
    state = pretrained.load_pretrained_model("test-official-mambaic").state_dict()
    official = from_official_state_dict(release["state_dict"])
    # the entropy models' tables are rebuilt by update() at load time
    weights = [key for key in official if not key.endswith(("_quantized_cdf", "_offset", "_cdf_length", "scale_table"))]
    assert len(weights) > 50 and all(torch.equal(state[key], official[key]) for key in weights)


def test_second_load_neither_downloads_nor_converts_again(hub, conversions):
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    first = fetch_pretrained("test-official-mambaic")
    stamp = first.stat().st_mtime_ns
    calls = len(hub.calls)
    assert fetch_pretrained("test-official-mambaic") == first
    assert conversions == ["test-official-mambaic"]
    assert len(hub.calls) == calls and first.stat().st_mtime_ns == stamp


def test_pinned_checksum_mismatch_is_refused_before_conversion(hub, monkeypatch, tmp_path, conversions):
    pinned = PretrainedWeights(**{**MAMBAIC.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(pretrained.PRETRAINED, MAMBAIC.config_id, pinned)
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    with pytest.raises(UserError, match=r"expected 0{64} \(pinned in effvision\)"):
        fetch_pretrained("test-official-mambaic")
    assert conversions == [] and not (tmp_path / "cache/mambaic/test-official-mambaic.safetensors").exists()


def test_pinned_checksum_match_is_recorded_as_pinned(hub, monkeypatch, tmp_path):
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    digest = sha256(tmp_path / "hub/authors/tiny-mambaic/checkpoint0.025.pth.tar")
    monkeypatch.setitem(pretrained.PRETRAINED, MAMBAIC.config_id,
                        PretrainedWeights(**{**MAMBAIC.__dict__, "sha256": digest}))
    fetch_pretrained("test-official-mambaic")
    record = json.loads((tmp_path / "cache/mambaic/test-official-mambaic.json").read_text())
    assert record["trust"] == "pinned"


def test_checksum_recorded_at_first_use_refuses_a_changed_file_later(hub, tmp_path):
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release(seed=0))
    (fetch_pretrained("test-official-mambaic")).unlink()
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release(seed=1))
    with pytest.raises(UserError, match="recorded at first use"):
        fetch_pretrained("test-official-mambaic")


def test_a_changed_converted_file_is_refused(hub):
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    converted = fetch_pretrained("test-official-mambaic")
    data = bytearray(converted.read_bytes())
    data[-1] ^= 1
    converted.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the SHA-256 recorded"):
        fetch_pretrained("test-official-mambaic")


@pytest.mark.parametrize("variable", ["EFFVISION_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_error_names_the_file_and_where_to_place_it(hub, monkeypatch, tmp_path, variable):
    monkeypatch.setenv(variable, "1")
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    with pytest.raises(UserError) as error:
        fetch_pretrained("test-official-mambaic")
    place = tmp_path / "cache" / "mambaic" / "checkpoint0.025.pth.tar"
    assert "download checkpoint0.025.pth.tar from https://huggingface.co/authors/tiny-mambaic" in str(error.value)
    assert f"place it at {place}" in str(error.value) and "offline" in str(error.value)
    assert hub.calls[-1]["local_files_only"] is True


def test_a_placed_file_is_used_offline_without_asking_the_hub(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("EFFVISION_OFFLINE", "1")
    place = tmp_path / "cache" / "mambaic" / "checkpoint0.025.pth.tar"
    place.parent.mkdir(parents=True)
    torch.save(mambaic_release(), place)
    fetch_pretrained("test-official-mambaic")
    record = json.loads((tmp_path / "cache/mambaic/test-official-mambaic.json").read_text())
    assert hub.calls == [] and record["source"] == str(place)


@pytest.fixture()
def no_network(monkeypatch):
    """A resolver that knows no host name, as on a machine without a network; no proxy configured."""
    import socket

    def fail(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)


def test_hub_unreachable_says_why_without_a_network_and_nothing_behind_a_proxy(no_network, monkeypatch):
    assert "huggingface.co does not resolve" in pretrained.hub_unreachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert pretrained.hub_unreachable() is None


def test_without_a_network_the_error_comes_at_once_from_the_cache_only(hub, no_network, monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "hub_unreachable", REAL_HUB_UNREACHABLE)  # the fixture's stand-in undone
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    with pytest.raises(UserError) as error:
        fetch_pretrained("test-official-mambaic")
    message = str(error.value)
    assert "does not resolve" in message and "not in the Hugging Face cache" in message
    assert f"place it at {tmp_path / 'cache' / 'mambaic' / 'checkpoint0.025.pth.tar'}" in message
    assert [call["local_files_only"] for call in hub.calls] == [True]  # never the retrying download


def test_without_a_network_a_file_in_the_hub_cache_is_still_used(hub, no_network, monkeypatch):
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    hub.downloaded.add(("authors/tiny-mambaic", "checkpoint0.025.pth.tar"))  # fetched on an earlier day
    monkeypatch.setattr(pretrained, "hub_unreachable", REAL_HUB_UNREACHABLE)
    assert fetch_pretrained("test-official-mambaic").is_file()
    assert [call["local_files_only"] for call in hub.calls] == [True]


def test_cache_follows_xdg_cache_home_unless_effvision_cache_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("EFFVISION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_dir() == tmp_path / "xdg" / "effvision"
    monkeypatch.setenv("EFFVISION_CACHE", str(tmp_path / "mine"))
    assert pretrained.cache_dir() == tmp_path / "mine"


def test_without_download_only_local_copies_are_used(hub):
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    with pytest.raises(UserError, match=r"downloading was not asked for \(--pretrained"):
        fetch_pretrained("test-official-mambaic", download=False)
    assert hub.calls[-1]["local_files_only"] is True


def test_repository_and_file_can_be_overridden_for_a_mirror(hub, monkeypatch):
    monkeypatch.setenv("EFFVISION_PRETRAINED_TEST_OFFICIAL_MAMBAIC_REPO", "mirror/copy")
    monkeypatch.setenv("EFFVISION_PRETRAINED_TEST_OFFICIAL_MAMBAIC_FILENAME", "ckpts/model.pth.tar")
    hub.publish("mirror/copy", "ckpts/model.pth.tar", mambaic_release())
    fetch_pretrained("test-official-mambaic")
    assert hub.calls[-1]["repo_id"] == "mirror/copy" and hub.calls[-1]["filename"] == "ckpts/model.pth.tar"


def test_taming_vqgan_without_a_known_repository_says_where_to_place_it(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFVISION_CACHE", str(tmp_path))
    with pytest.raises(UserError) as error:
        fetch_pretrained("taming-f16-16384")
    message = str(error.value)
    assert f"place it at {tmp_path / 'vqgan' / 'vqgan_imagenet_f16_16384.ckpt'}" in message
    assert "heibox.uni-heidelberg.de" in message and "EFFVISION_PRETRAINED_TAMING_F16_16384_REPO" in message


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.pt")  # torch's zip format
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"x": Evil()}, protocol=2))  # a bare pickle
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command))
    with pytest.raises(UserError, match=r"refusing to load .*needs (posix|nt)\.system"):
        load_torch_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint: torch.save writes a zip archive"):
        load_torch_checkpoint(tmp_path / "evil.pkl")  # torch.save has not written bare pickles since PyTorch 1.6
    assert ran == []


def test_a_malicious_official_file_is_refused_through_the_pretrained_path(hub, monkeypatch, tmp_path):
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", {"state_dict": {}, "x": Evil()})
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command))
    with pytest.raises(UserError, match="refusing to load"):
        fetch_pretrained("test-official-mambaic")
    assert ran == [] and not (tmp_path / "cache/mambaic/test-official-mambaic.json").exists()


def test_lightning_checkpoint_loads_with_inert_stand_ins(tmp_path, lightning_module):
    torch.save(taming_release(lightning_module), tmp_path / "last.ckpt")
    with pytest.raises(Exception):  # noqa: B017 - torch's own restricted loader refuses it first
        torch.load(tmp_path / "last.ckpt", weights_only=True)
    loaded = load_torch_checkpoint(tmp_path / "last.ckpt")
    (callback_class,) = loaded["callbacks"]
    assert issubclass(callback_class, InertObject) and callback_class.__name__ == "ModelCheckpoint"
    assert loaded["callbacks"][callback_class]["best_model_score"] == 0.25
    assert loaded["hparams"].base_learning_rate == 4.5e-6
    assert torch.equal(loaded["state_dict"]["loss.discriminator.main.0.weight"],
                       taming_release(lightning_module)["state_dict"]["loss.discriminator.main.0.weight"])


def test_taming_release_converts_and_codes_with_the_fixed_length_index_code(hub, lightning_module):
    hub.publish("authors/tiny-taming", "last.ckpt", taming_release(lightning_module))
    codec = load_vqgan(pretrained=True)
    image = torch.rand(3, 32, 48)
    sections = codec.encode(image)
    assert codec.config_id == "test-taming" and sections[0][0] == FIXED_LENGTH  # no fitted index model
    assert len(sections) == 1  # no colour band: the official release codes as Mao et al. do
    expected = VQModel(TINY_VQGAN)
    expected.load_state_dict({k: v for k, v in taming_release(lightning_module)["state_dict"].items()
                              if not k.startswith("loss.")})
    assert all(torch.equal(codec.model.vq.state_dict()[k], v) for k, v in expected.state_dict().items())
    assert codec.decode(sections, 32, 48).shape == (3, 32, 48)


def test_loader_with_pretrained_and_checkpoint_is_a_user_error(hub, tmp_path):
    with pytest.raises(UserError, match="not both"):
        load_mambaic(pretrained=True, checkpoint=tmp_path / "x.safetensors")


@pytest.fixture()
def codec_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {name: cli.COMMANDS[name] for name in ("encode", "decode")})


def test_cli_encode_pretrained_then_decode_finds_the_weights_by_config_id(hub, tmp_path, codec_commands, capsys):
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    evc, out = tmp_path / "x.evc", tmp_path / "out.png"
    assert cli.main(["encode", str(tmp_path / "in.png"), "-o", str(evc), "--pretrained", "--device", "cpu"]) == 0
    container = parse(evc.read_bytes())
    assert (container.codec, container.config_id) == ("mambaic", "test-official-mambaic")
    assert cli.main(["decode", str(evc), "-o", str(out), "--device", "cpu"]) == 0  # from effvision's cache
    assert Image.open(out).size == (40, 24)
    assert load_mambaic(config_id="test-official-mambaic").fingerprint() == container.fingerprint


def test_cli_decode_downloads_only_with_pretrained(hub, tmp_path, codec_commands, capsys, monkeypatch):
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    Image.new("RGB", (16, 16), (90, 120, 200)).save(tmp_path / "in.png")
    evc = tmp_path / "x.evc"
    assert cli.main(["encode", str(tmp_path / "in.png"), "-o", str(evc), "--pretrained", "--device", "cpu"]) == 0
    monkeypatch.setenv("EFFVISION_CACHE", str(tmp_path / "fresh-cache"))
    hub.downloaded.clear()
    capsys.readouterr()
    assert cli.main(["decode", str(evc), "-o", str(tmp_path / "a.png"), "--device", "cpu"]) == 1
    assert "--pretrained" in capsys.readouterr().err
    assert cli.main(["decode", str(evc), "-o", str(tmp_path / "b.png"), "--pretrained", "--device", "cpu"]) == 0


def test_eval_codec_pretrained_evaluates_the_official_weights(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"eval-codec": cli.COMMANDS["eval-codec"]})
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "photos/a.png")
    arguments = ["eval-codec", "--data", str(tmp_path / "photos"), "--pretrained", "--classical", "jpeg",
                 "--json", str(tmp_path / "rd.json")]
    assert cli.main(arguments) == 0
    assert "test-official-mambaic" in (tmp_path / "rd.json").read_text()


def test_zoo_style_load_returns_the_official_model_ready_to_code(hub):
    from effvision.codecs import mambaic

    release = mambaic_release()
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", release)
    model = mambaic.load(pretrained=True)
    official = from_official_state_dict(release["state_dict"])
    assert isinstance(model, mambaic.MambaIC) and not model.training
    assert torch.equal(model.state_dict()["g_a.0.weight"], official["g_a.0.weight"])
    x = torch.rand(1, 3, 64, 64)
    coded = model.compress(x)
    assert model.decompress(coded["strings"], coded["shape"])["x_hat"].shape == x.shape


@pytest.mark.parametrize("content", ["[" * 200_000 + "]" * 200_000, " " * (1 << 17)])
def test_a_planted_record_that_nests_deeply_or_is_large_is_a_clear_error(hub, tmp_path, content):
    """A record of 200000 nested brackets ended in a RecursionError with no hint to delete it."""
    hub.publish("authors/tiny-mambaic", "checkpoint0.025.pth.tar", mambaic_release())
    record = tmp_path / "cache/mambaic/test-official-mambaic.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(content)
    with pytest.raises(UserError, match="is not an effvision pretrained-weights record .*; delete it"):
        fetch_pretrained("test-official-mambaic")
