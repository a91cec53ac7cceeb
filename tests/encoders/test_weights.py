"""Offline-first weight loading, exercised without the network: local HTTP server, file://, paths."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.encoders import _weights, get_encoder

NAME = "test_tiny_resnet"


@pytest.fixture(scope="module")
def reference_weights():
    """A resnet18 encoder state dict (random) standing in for published weights."""
    torch.manual_seed(0)
    return get_encoder("resnet18").state_dict()


@pytest.fixture
def registered(tmp_path, reference_weights, monkeypatch):
    """Register a resnet18 clone whose 'imagenet' weights live at a URL we control."""
    monkeypatch.setenv("SMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the suite default; these tests use 127.0.0.1
    path = tmp_path / "srv" / "weights.pth"
    path.parent.mkdir()
    torch.save(reference_weights, path)
    entry = dict(smp.encoders.encoders["resnet18"])
    settings = {"imagenet": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    smp.encoders.encoders[NAME] = {**entry, "pretrained_settings": settings}
    yield path, settings["imagenet"]
    del smp.encoders.encoders[NAME]


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "srv"
    root.mkdir(exist_ok=True)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _same(encoder, reference):
    return all(
        torch.equal(encoder.state_dict()[k], v) for k, v in reference.items() if not k.startswith("fc.")
    )


def test_http_download_cache_and_hash(registered, http_server, reference_weights, tmp_path):
    path, setting = registered
    setting["url"] = f"{http_server}/weights.pth"
    setting["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    setting["size"] = path.stat().st_size
    enc = get_encoder(NAME, weights="imagenet")
    assert _same(enc, reference_weights)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and not any(p.name.endswith(".part") for p in cached)
    # Second build is served from the cache even with the server's file gone.
    path.unlink()
    assert _same(get_encoder(NAME, weights="imagenet"), reference_weights)


def test_corrupt_download_is_rejected_and_not_cached(registered, http_server, tmp_path):
    path, setting = registered
    setting["url"] = f"{http_server}/weights.pth"
    setting["sha256"] = "0" * 64
    with pytest.raises(_weights.WeightsUnavailableError, match="hash check"):
        get_encoder(NAME, weights="imagenet")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_truncated_file_gives_clear_error(registered, tmp_path):
    path, _ = registered
    data = path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(_weights.WeightsUnavailableError, match="truncated, corrupt"):
        get_encoder("resnet18", weights=str(bad))


def test_size_mismatch_gives_clear_error(registered, http_server):
    path, setting = registered
    setting["url"] = f"{http_server}/weights.pth"
    setting["size"] = path.stat().st_size + 1
    with pytest.raises(_weights.WeightsUnavailableError, match="truncated or corrupt"):
        get_encoder(NAME, weights="imagenet")


def test_unreachable_url_and_offline_mode(registered, monkeypatch):
    _, setting = registered
    setting["url"] = "http://127.0.0.1:9/weights.pth"  # discard port: nothing listens
    with pytest.raises(_weights.WeightsUnavailableError, match="Could not download.*encoder_weights="):
        get_encoder(NAME, weights="imagenet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(_weights.WeightsUnavailableError, match="Offline mode"):
        get_encoder(NAME, weights="imagenet")


def test_file_url_local_path_safetensors_and_state_dict(registered, reference_weights, tmp_path):
    path, setting = registered
    setting["url"] = path.as_uri()
    assert _same(get_encoder(NAME, weights="imagenet"), reference_weights)
    assert _same(get_encoder("resnet18", weights=str(path)), reference_weights)
    assert _same(get_encoder("resnet18", weights=path.as_uri()), reference_weights)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference_weights.items()}, str(st))
    assert _same(get_encoder("resnet18", weights=st), reference_weights)
    assert _same(get_encoder("resnet18", weights=dict(reference_weights)), reference_weights)
    # Wrapped checkpoints ({"state_dict": ...}) as written by training loops.
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": reference_weights, "epoch": 3}, wrapped)
    assert _same(get_encoder("resnet18", weights=wrapped), reference_weights)


def test_pretrained_first_conv_patching(reference_weights):
    w = reference_weights["conv1.weight"]
    one = get_encoder("resnet18", in_channels=1, weights=dict(reference_weights))
    assert torch.allclose(one.conv1.weight, w.sum(1, keepdim=True))
    five = get_encoder("resnet18", in_channels=5, weights=dict(reference_weights))
    expected = torch.cat([w, w[:, :2]], dim=1) * 3 / 5
    assert torch.allclose(five.conv1.weight, expected)


def test_wrong_shape_names_the_keys(reference_weights):
    bad = dict(reference_weights)
    bad["layer1.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    del bad["bn1.weight"]
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight.*missing keys: bn1\.weight"):
        get_encoder("resnet18", weights=bad)


def test_weights_never_run_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Evil()}, path)
    with pytest.raises(_weights.WeightsUnavailableError):
        get_encoder("resnet18", weights=str(path))
    assert not (tmp_path / "pwned").exists()


def test_fake_hf_hub_cache_offline(reference_weights, tmp_path, monkeypatch):
    """A registry entry with repo_id + revision resolves from a pre-populated HF cache offline."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--smp-hub--fake.imagenet" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference_weights.items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    setting = {"repo_id": "smp-hub/fake.imagenet", "revision": revision}
    state = _weights.fetch_setting(setting)
    assert torch.equal(state["conv1.weight"], reference_weights["conv1.weight"])
    with pytest.raises(
        _weights.WeightsUnavailableError, match="(?s)smp-hub/missing.*huggingface-cli download"
    ):
        _weights.fetch_setting({"repo_id": "smp-hub/missing", "revision": revision})


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet-b0"])
def test_pretrained_build_draws_no_random_values_and_loads_exactly(name):
    """The load overwrites every tensor, so the build skips its random fills (and consumes no RNG)."""
    torch.manual_seed(0)
    reference = get_encoder(name).eval()
    weights = {k: v.clone() for k, v in reference.state_dict().items()}
    rng = torch.get_rng_state()
    loaded = get_encoder(name, weights=weights).eval()
    assert torch.equal(torch.get_rng_state(), rng)
    state = loaded.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(loaded(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A second build without weights still draws (and differs from the first).
    assert not torch.equal(get_encoder(name).state_dict()[next(iter(weights))], next(iter(weights.values())))


def test_encoder_registered_by_hand_is_still_initialised_before_its_load(reference_weights):
    """Only our own families skip the fills: a user's class may derive values from its init."""

    class Derived(type(get_encoder("resnet18"))):
        pass

    Derived.__module__ = "user_code"
    smp.encoders.encoders["user_resnet18"] = {**smp.encoders.encoders["resnet18"], "encoder": Derived}
    try:
        rng = torch.get_rng_state()
        encoder = get_encoder("user_resnet18", weights=dict(reference_weights))
        assert not torch.equal(torch.get_rng_state(), rng)  # built with its random init, then loaded
        assert _same(encoder, reference_weights)
    finally:
        del smp.encoders.encoders["user_resnet18"]


@pytest.mark.parametrize(
    "name", ["resnet18", "efficientnet-b0", "timm-efficientnet-b0", "mobileone_s0", "mit_b0", "densenet121"]
)
def test_load_into_copies_straight_into_the_tensors(name, monkeypatch):
    """A checked, complete state dict is copied tensor by tensor, without torch's per-module walk,
    and gives exactly what load_state_dict gives (dtype conversion and BatchNorm counters too)."""
    torch.manual_seed(0)
    reference = get_encoder(name)
    weights = {k: v.double() if v.is_floating_point() else v + 3 for k, v in reference.state_dict().items()}
    weights["extra.classifier.weight"] = torch.zeros(1)  # dropped by _ignored_weight_prefixes below
    monkeypatch.setattr(type(reference), "_ignored_weight_prefixes", ("extra.",), raising=False)
    expected = get_encoder(name)
    expected.load_state_dict(weights)

    target = get_encoder(name)
    assert _weights._copies_plainly(target)

    def walk(*args, **kwargs):
        raise AssertionError("torch's load_state_dict ran")

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", walk)
    _weights.load_into(target, weights, "test")
    got, want = target.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_load_into_keeps_load_state_dict_where_modules_customise_loading(reference_weights):
    """Hooks or a module's own _load_from_state_dict still run: they may rename or transform."""
    encoder = get_encoder("resnet18")
    seen = []
    encoder.layer1.register_load_state_dict_pre_hook(lambda *args, **kwargs: seen.append(args[2]))
    assert not _weights._copies_plainly(encoder)
    _weights.load_into(encoder, reference_weights, "test")
    assert seen == ["layer1."] and _same(encoder, reference_weights)

    class Doubling(torch.nn.BatchNorm2d):
        def _load_from_state_dict(self, state_dict, prefix, *args):
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"] * 2
            super()._load_from_state_dict(state_dict, prefix, *args)

    encoder = get_encoder("resnet18")
    encoder.bn1.__class__ = Doubling
    assert not _weights._copies_plainly(encoder)
    _weights.load_into(encoder, reference_weights, "test")
    assert torch.equal(encoder.bn1.weight, reference_weights["bn1.weight"] * 2)

    encoder = get_encoder("resnet18")
    encoder.load_state_dict = lambda *args, **kwargs: seen.append("own load_state_dict")
    assert not _weights._copies_plainly(encoder)


@pytest.mark.parametrize("name", ["efficientnet-b0", "mobilenet_v2", "timm-efficientnet-b0"])
def test_model_loads_pretrained_weights_straight_into_channels_last(name, monkeypatch):
    """A model keeps its weights in channels_last: a pretrained encoder's load writes that layout
    directly (one copy instead of two), with the same values, and the model's own conversion after
    the build finds nothing left to convert in the encoder."""
    from segmentation_models_pytorch.base import model as model_module

    torch.manual_seed(0)
    weights = {k: v.clone().contiguous() for k, v in get_encoder(name).state_dict().items()}
    cl = torch.channels_last
    left_over = []
    convert = model_module.to_channels_last

    def spy(module):
        for key, tensor in module.state_dict(keep_vars=True).items():
            if key.startswith("encoder.") and tensor.dim() == 4:
                if not tensor.is_contiguous(memory_format=cl):
                    left_over.append(key)
        return convert(module)

    monkeypatch.setattr(model_module, "to_channels_last", spy)
    model = smp.Unet(name, encoder_weights=weights, encoder_depth=3, decoder_channels=(16, 8, 4))
    assert left_over == []
    state = model.encoder.state_dict()
    for k, v in weights.items():
        assert torch.equal(state[k], v), k
        assert v.dim() != 4 or state[k].is_contiguous(memory_format=cl), k
