"""save_pretrained / from_pretrained / push_to_hub: SMP 0.6.0's on-disk format, offline, no network.

Compatibility with SMP 0.6.0 is checked against tests/fixtures/golden/hub.json (written by
tests/fixtures/make_golden_hub.py with the reference library): our files must match what SMP writes,
and a folder laid out exactly like SMP's must load here and reproduce SMP's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import golden_utils as gu
import pytest
import torch
from safetensors.torch import save_file

import segmentation_models_pytorch as smp

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "fixtures" / "golden" / "hub.json").read_text())["configs"]


def _tiny_unet(**kwargs):
    config = dict(encoder_name="resnet18", encoder_depth=3, encoder_weights=None)
    config["decoder_channels"] = (32, 16, 8)
    config.update(kwargs)
    return smp.Unet(**config).eval()


def _safetensors_header(path: Path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", {})
    return {k: [v["dtype"], v["shape"]] for k, v in sorted(header.items())}, metadata


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, tuple) else [out]


# ----------------------------------------------------------------------------------- format
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_save_pretrained_writes_what_smp_writes(tmp_path, name):
    golden = GOLDEN[name]
    model = getattr(smp, golden["arch"])(**golden["kwargs"]).eval()
    model.save_pretrained(tmp_path, dataset="toy-dataset", metrics={"iou": 0.5})

    assert sorted(os.listdir(tmp_path)) == golden["files"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == golden["config"]
    assert (tmp_path / "config.json").read_text() == golden["config_text"]  # sorted keys, indent 2
    tensors, metadata = _safetensors_header(tmp_path / "model.safetensors")
    assert tensors == golden["safetensors"]
    assert metadata == golden["safetensors_metadata"]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_folder_written_by_smp_loads_and_reproduces_its_output(tmp_path, name):
    """A folder with SMP's config.json and a state dict in SMP's layout gives SMP's numbers."""
    golden = GOLDEN[name]
    (tmp_path / "config.json").write_text(golden["config_text"])
    source = getattr(smp, golden["arch"])(**golden["kwargs"])
    gu.fill_state_dict(source)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    assert {k: [str(v.dtype).replace("torch.float32", "F32").replace("torch.int64", "I64"), list(v.shape)]
            for k, v in state.items()} == golden["safetensors"]
    save_file(state, str(tmp_path / "model.safetensors"))

    model = smp.from_pretrained(tmp_path)
    assert type(model).__name__ == golden["arch"]
    assert not model.training
    outputs = _outputs(model, gu.make_input((1, 3, 64, 64)))
    assert len(outputs) == len(golden["outputs"])
    for actual, expected in zip(outputs, golden["outputs"]):
        ok, message = gu.compare_summary(actual, expected)
        assert ok, message


def test_model_card(tmp_path):
    model = _tiny_unet(classes=4, aux_params={"classes": 3})
    model.save_pretrained(tmp_path, dataset="toy-dataset", metrics={"iou": 0.75})
    text = (tmp_path / "README.md").read_text()
    front = text.split("---")[1]
    for line in GOLDEN["unet_aux"]["card_metadata"]:
        if line.startswith(("library_name", "license", "pipeline_tag", "- segmentation-models-pytorch")):
            assert line in front
    expected_texts = ("Unet", "`resnet18`", "| Output classes | 4 |", "3 classes", "toy-dataset")
    for expected in (*expected_texts, '"iou": 0.75', 'smp.from_pretrained("'):
        assert expected in text, expected


def test_model_card_kwargs_and_existing_card_kept(tmp_path):
    model = _tiny_unet()
    model.save_pretrained(tmp_path, model_card_kwargs={"dataset": "from-kwargs"})
    assert "from-kwargs" in (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").write_text("my own card")
    model.save_pretrained(tmp_path, dataset="other")
    assert (tmp_path / "README.md").read_text() == "my own card"


# ----------------------------------------------------------------------------------- round trip
def test_round_trip_same_outputs_and_config(tmp_path):
    model = _tiny_unet(
        classes=3, aux_params={"classes": 2}, decoder_attention_type="scse", decoder_channels=(32, 16, 16)
    )
    gu.fill_state_dict(model)
    model.save_pretrained(tmp_path)
    x = gu.make_input((2, 3, 64, 64))

    for loaded in (smp.from_pretrained(tmp_path), smp.Unet.from_pretrained(str(tmp_path))):
        assert isinstance(loaded, smp.Unet) and not loaded.training
        for a, b in zip(_outputs(loaded, x), _outputs(model, x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        saved = {k: v for k, v in model.config.items()}
        saved["decoder_channels"] = list(saved["decoder_channels"])
        assert loaded.config == saved
    # the model's own config is not modified by saving
    assert "_model_class" not in model.config


def test_saved_config_never_downloads_encoder_weights(tmp_path):
    model = _tiny_unet()
    model.config["encoder_weights"] = "imagenet"  # as if built with pretrained weights
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["encoder_weights"] is None
    assert "initialised from `imagenet` weights" in (tmp_path / "README.md").read_text()
    assert model.config["encoder_weights"] == "imagenet"

    # A folder written by SMP keeps whatever the user passed; loading must still not download.
    config = json.loads((tmp_path / "config.json").read_text())
    config["encoder_weights"] = "imagenet"
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = smp.from_pretrained(tmp_path)  # the suite's network guard fails any download
    assert loaded.config["encoder_weights"] is None


def test_overrides_and_map_location(tmp_path):
    _tiny_unet(classes=2).save_pretrained(tmp_path)
    model = smp.from_pretrained(tmp_path, activation="sigmoid", map_location="cpu")
    out = _outputs(model, torch.randn(1, 3, 64, 64))[0]
    assert out.min() >= 0 and out.max() <= 1
    assert model.config["activation"] == "sigmoid"


def test_finetune_with_other_classes(tmp_path):
    source = _tiny_unet(classes=2)
    gu.fill_state_dict(source)
    source.save_pretrained(tmp_path)

    with pytest.raises(RuntimeError, match="strict=False"):
        smp.from_pretrained(tmp_path, classes=5)

    with pytest.warns(UserWarning, match=r"segmentation_head\.0\.weight") as record:
        model = smp.from_pretrained(tmp_path, classes=5, strict=False)
    assert any("(2, 8, 3, 3)" in str(w.message) and "(5, 8, 3, 3)" in str(w.message) for w in record)
    assert model.segmentation_head[0].out_channels == 5
    assert _outputs(model, torch.randn(1, 3, 64, 64))[0].shape == (1, 5, 64, 64)
    for key, value in source.state_dict().items():
        if not key.startswith("segmentation_head"):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_class_method_is_not_strict_by_default_like_smp(tmp_path):
    _tiny_unet(classes=2).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="segmentation_head"):
        model = smp.Unet.from_pretrained(tmp_path, classes=3)
    assert model.segmentation_head[0].out_channels == 3


def test_missing_keys_are_reported_with_strict_false(tmp_path):
    model = _tiny_unet()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("decoder.blocks.0.")}
    state["unexpected.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    model.save_pretrained(tmp_path / "ref")
    (tmp_path / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    with pytest.raises(RuntimeError, match="decoder.blocks.0"):
        smp.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"missing \(left as initialised\): decoder\.blocks\.0") as record:
        smp.from_pretrained(tmp_path, strict=False)
    assert any("unexpected (ignored): unexpected.weight" in str(w.message) for w in record)


def test_fresh_offline_process_reproduces_outputs(tmp_path):
    """Load in a new interpreter with HF_HUB_OFFLINE=1: same outputs, and no hub client import."""
    model = _tiny_unet(classes=3)
    gu.fill_state_dict(model)
    model.save_pretrained(tmp_path / "model")
    x = gu.make_input((1, 3, 64, 64))
    torch.save(x, tmp_path / "x.pt")
    expected = _outputs(model, x)[0]

    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads({torch.get_num_threads()})  # oneDNN's reductions split by thread
        import segmentation_models_pytorch as smp
        assert "huggingface_hub" not in sys.modules, "import smp pulled in huggingface_hub"
        model = smp.from_pretrained({str(tmp_path / "model")!r})
        assert "huggingface_hub" not in sys.modules, "loading a local folder pulled in huggingface_hub"
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", script]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- push_to_hub
class _FakeHub:
    """Stands in for HfApi's network calls; records what would be uploaded."""

    def __init__(self):
        self.calls = []

    def install(self, monkeypatch):
        import huggingface_hub

        fake = self

        class _Repo:
            def __init__(self, repo_id):
                self.repo_id = repo_id

        def create_repo(self, repo_id, **kwargs):
            fake.calls.append(("create_repo", repo_id, kwargs))
            return _Repo(repo_id if "/" in repo_id else f"user/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            fake.calls.append(("upload_folder", repo_id, kwargs, files))
            return f"https://huggingface.co/{repo_id}/commit/abc123"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        return self


def test_push_to_hub_uploads_the_saved_folder(monkeypatch, tmp_path):
    hub = _FakeHub().install(monkeypatch)
    model = _tiny_unet(classes=2)
    url = model.push_to_hub(
        "me/tiny-unet", commit_message="first", private=True, branch="dev", metrics={"iou": 0.9},
        dataset="toy",
    )
    assert url == "https://huggingface.co/me/tiny-unet/commit/abc123"
    (create, repo_id, create_kwargs), upload = hub.calls[0], hub.calls[1]
    assert (create, repo_id, create_kwargs["private"], create_kwargs["exist_ok"]) == (
        "create_repo", "me/tiny-unet", True, True)
    _, repo_id, kwargs, files = upload
    assert repo_id == "me/tiny-unet"
    assert (kwargs["commit_message"], kwargs["revision"], kwargs["repo_type"]) == ("first", "dev", "model")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(files["config.json"])["_model_class"] == "Unet"
    card = files["README.md"].decode()
    assert 'smp.from_pretrained("me/tiny-unet")' in card and '"iou": 0.9' in card and "toy" in card

    # what was uploaded loads back
    folder = tmp_path / "downloaded"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    torch.testing.assert_close(
        _outputs(smp.from_pretrained(folder), torch.ones(1, 3, 64, 64))[0],
        _outputs(model, torch.ones(1, 3, 64, 64))[0],
    )


def test_save_pretrained_can_push(monkeypatch, tmp_path):
    hub = _FakeHub().install(monkeypatch)
    url = _tiny_unet().save_pretrained(tmp_path / "my-model", push_to_hub=True)
    assert url == "https://huggingface.co/user/my-model/commit/abc123"  # repo named after the folder
    assert hub.calls[0][1] == "my-model"
    assert (tmp_path / "my-model" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------- errors
def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        smp.from_pretrained(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        smp.from_pretrained(tmp_path / "file.txt")
    with pytest.raises(FileNotFoundError, match="config.json"):
        smp.from_pretrained(tmp_path)

    _tiny_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="holds a Unet model, not a FPN"):
        smp.FPN.from_pretrained(tmp_path / "unet")

    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config["_model_class"] = "MyUnet"
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="MyUnet"):
        smp.from_pretrained(tmp_path / "unet")
    assert isinstance(smp.Unet.from_pretrained(tmp_path / "unet"), smp.Unet)  # the class still loads it


def test_hub_repo_offline_is_a_clear_error(monkeypatch, tmp_path):
    """A repo id that is not in the local cache fails in offline mode, without touching the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError):
        smp.from_pretrained("someone/not-cached-model", cache_dir=tmp_path)


def test_unserialisable_config_is_refused_before_writing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _tiny_unet(activation=torch.nn.Sigmoid)
    with pytest.raises(TypeError, match="activation=.*JSON"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # an explicit config is written as given (plus the class name)
    model.save_pretrained(tmp_path / "out", config={**model.config, "activation": "sigmoid"})
    assert json.loads((tmp_path / "out" / "config.json").read_text())["activation"] == "sigmoid"


def test_user_subclass_round_trip(tmp_path):
    class MyUnet(smp.Unet):
        pass

    model = MyUnet(encoder_name="resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(8, 8, 8))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_model_class"] == "MyUnet"
    assert isinstance(MyUnet.from_pretrained(tmp_path), MyUnet)


def test_loading_draws_no_random_values_and_initialises_what_it_does_not_load(tmp_path):
    """from_pretrained skips the random init the checkpoint overwrites, and only that."""
    source = _tiny_unet(classes=2)
    gu.fill_state_dict(source)
    source.save_pretrained(tmp_path)
    rng = torch.get_rng_state()
    smp.from_pretrained(tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)

    with pytest.warns(UserWarning, match="segmentation_head"):
        model = smp.from_pretrained(tmp_path, classes=5, strict=False)
    conv = model.segmentation_head[0]
    bound = (6 / (conv.weight[0].numel() + conv.weight[:, 0].numel())) ** 0.5  # xavier_uniform_
    assert conv.weight.abs().max() <= bound and conv.weight.std() > bound / 4
    assert torch.equal(conv.bias, torch.zeros(5))
    for key, value in source.state_dict().items():
        if not key.startswith("segmentation_head"):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)

    # Keys missing from the file are "left as initialised": initialised, not uninitialised memory.
    state = {k: v.contiguous() for k, v in source.state_dict().items() if "decoder.blocks.0." not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="decoder.blocks.0"):
        model = smp.from_pretrained(tmp_path, strict=False)
    block = model.decoder.blocks[0]
    norms = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    for m in block.modules():
        if isinstance(m, torch.nn.Conv2d):  # kaiming_uniform_, fan_in
            bound = (6 / m.weight[0].numel()) ** 0.5
            assert m.weight.abs().max() <= bound and m.weight.std() > bound / 4
