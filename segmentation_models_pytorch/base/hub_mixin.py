"""Save, load and share whole models: ``save_pretrained``, ``from_pretrained``, ``push_to_hub``.

The folder layout is the one written by SMP 0.6.0 (through ``huggingface_hub``'s
``PyTorchModelHubMixin``), so checkpoints move freely between the two libraries:

* ``config.json``: the constructor arguments (sorted keys, 2-space indent) plus ``_model_class``,
  the class name ``smp.from_pretrained`` uses to pick the architecture;
* ``model.safetensors``: the state dict (tensors that share storage are stored once and their other
  names recorded in the file's metadata, as ``safetensors.torch.save_model`` does);
* ``README.md``: a model card.

Unlike SMP we do not subclass ``PyTorchModelHubMixin``: ``huggingface_hub`` and ``safetensors`` are
imported only inside the methods that need them, so ``import segmentation_models_pytorch`` stays
light, and loading a local folder never touches ``huggingface_hub`` at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Type, TypeVar, Union

import torch

from . import initialization as init

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard
    from torch import nn

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_WEIGHTS_NAME = "pytorch_model.bin"  # older hub checkpoints; read, never written
MODEL_CARD_NAME = "README.md"
MODEL_CLASS_KEY = "_model_class"

LIBRARY_NAME = "segmentation-models-pytorch"
REPO_URL = "https://github.com/qubvel/segmentation_models.pytorch"
DOCS_URL = "https://smp.readthedocs.io/en/latest/"
# Tags the Hub uses to list models; the first two mark the PyTorchModelHubMixin format.
CARD_TAGS = [
    "model_hub_mixin",
    "pytorch_model_hub_mixin",
    "segmentation-models-pytorch",
    "semantic-segmentation",
    "pytorch",
]

T = TypeVar("T", bound="SMPHubMixin")
PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------- config
def _jsonable_config(config: Dict[str, Any], model_class: str) -> Dict[str, Any]:
    """Return ``config`` as plain JSON types, or raise naming the value that cannot be written."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        try:
            out[key] = json.loads(json.dumps(value))  # tuples become lists, as json.dump writes them
        except (TypeError, ValueError):
            raise TypeError(
                f"Cannot write {model_class} config value {key}={value!r} to config.json: it is not "
                "JSON-serialisable, so the model could not be rebuilt from the saved folder. Build the "
                "model with a JSON value instead (e.g. activation='sigmoid' rather than a class or "
                "function), or pass the config to write explicitly: save_pretrained(..., config={...})."
            ) from None
    return out


def _config_to_save(model: SMPHubMixin, config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    name = type(model).__name__
    if config is None:
        config = dict(getattr(model, "config", {}) or {})
        if not config:
            warnings.warn(
                f"{name} has no recorded constructor arguments; config.json will only name the class, "
                "so loading rebuilds it with default arguments.",
                stacklevel=3,
            )
        # The weights are in model.safetensors: rebuilding must never download encoder weights.
        if "encoder_weights" in config:
            config["encoder_weights"] = None
    elif not isinstance(config, dict):
        raise TypeError(f"config must be a dict of constructor arguments, got {type(config).__name__}.")
    config = _jsonable_config(config, name)
    config.setdefault(MODEL_CLASS_KEY, name)
    return config


def _read_config(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} must hold a JSON object of constructor arguments, got {type(config).__name__}."
        )
    return config


# ---------------------------------------------------------------------------------------- files
def _looks_like_local_path(name: str) -> bool:
    """Hub repo ids are ``name`` or ``namespace/name``; anything else is meant as a folder."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.exists(name)
    )


def _resolve_file(
    model_id: str,
    filename: str,
    hub_kwargs: Dict[str, Any],
    required: bool = True,
) -> Optional[str]:
    """Path of ``filename`` in a local folder or (downloaded from) a Hub repo; ``None`` if absent."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if os.path.isfile(path):
            return path
        if required:
            raise FileNotFoundError(
                f"{filename} not found in {os.path.abspath(model_id)!r}. Expected a folder written by "
                "model.save_pretrained() (config.json + model.safetensors)."
            )
        return None
    if _looks_like_local_path(model_id):
        what = "is a file, not a folder" if os.path.isfile(model_id) else "does not exist"
        raise FileNotFoundError(
            f"{model_id!r} {what}. from_pretrained takes a folder written by model.save_pretrained() "
            "or a Hugging Face Hub repo id such as 'username/model-name'."
        )

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id=model_id, filename=filename, library_name=LIBRARY_NAME, **hub_kwargs)
    except EntryNotFoundError as e:
        # Only a file the repo really lacks is optional; "not in the offline cache" is an error.
        if required or isinstance(e, LocalEntryNotFoundError):
            raise
        return None


def _load_weights_file(path: str, device: Union[str, torch.device]) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(path, device=str(device))
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        # save_model stores tensors shared by several names once and records "dropped -> kept".
        for dropped, kept in metadata.items():
            if dropped not in state and kept in state:
                state[dropped] = state[kept]
        return state
    return torch.load(path, map_location=device, weights_only=True)


def _load_into(model: nn.Module, state: Dict[str, torch.Tensor], strict: bool, source: str) -> Set[str]:
    """Load ``state`` into ``model``; returns the ``state_dict`` keys whose values were replaced."""
    own = model.state_dict()
    if strict:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RuntimeError(
                f"The weights in {source} do not fit {type(model).__name__} built from its config:\n{e}\n"
                "If you changed constructor arguments on purpose (e.g. classes= to fine-tune on other "
                "labels), pass strict=False to load the matching weights and skip the rest."
            ) from None
        return set(own)
    mismatched = {k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)}
    # SegmentationModel.load_state_dict(strict=False) skips and reports the shape mismatches itself.
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in mismatched]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        lines = [f" - missing (left as initialised): {k}" for k in missing]
        lines += [f" - unexpected (ignored): {k}" for k in unexpected]
        warnings.warn(
            f"Loaded {source} with strict=False; these keys did not load:\n" + "\n".join(lines),
            stacklevel=3,
        )
    return {k for k in state if k in own and k not in mismatched}


# ---------------------------------------------------------------------------------------- card
def _format_init_params(config: Dict[str, Any]) -> str:
    items = [f"    {json.dumps(k)}: {v!r}," for k, v in config.items() if not k.startswith("_")]
    return "{\n" + "\n".join(items) + "\n}"


def _card_text(
    model_name: str,
    config: Dict[str, Any],
    load_from: str,
    metrics: Any,
    dataset: Any,
    source_weights: Any,
) -> str:
    encoder = config.get("encoder_name", "custom")
    encoder_line = f"`{encoder}`"
    if isinstance(source_weights, str):
        encoder_line += f" (initialised from `{source_weights}` weights before training)"
    aux = config.get("aux_params")
    aux_line = f"{aux['classes']} classes" if isinstance(aux, dict) and "classes" in aux else "none"
    if metrics is None:
        metrics_text = "Not reported."
    elif isinstance(metrics, str):
        metrics_text = metrics
    else:
        metrics_text = "```json\n" + json.dumps(metrics, indent=4, default=str) + "\n```"
    dataset_text = str(dataset) if dataset is not None else "Not reported."
    return f"""
# {model_name} segmentation model

A `{model_name}` model from [segmentation_models_pytorch]({REPO_URL}).

| | |
|---|---|
| Architecture | `{model_name}` |
| Encoder | {encoder_line} |
| Input channels | {config.get("in_channels", "?")} |
| Output classes | {config.get("classes", "?")} |
| Output activation | {config.get("activation") or "none (logits)"} |
| Classification head | {aux_line} |

## Load the model

```python
import segmentation_models_pytorch as smp

model = smp.from_pretrained("{load_from}")
# fine-tune on a different number of classes (the segmentation head is re-initialised):
# model = smp.from_pretrained("{load_from}", classes=5, strict=False)
```

## Constructor arguments

```python
model_init_params = {_format_init_params(config)}
```

## Metrics

{metrics_text}

## Dataset

{dataset_text}

## More information

- Library: {REPO_URL}
- Documentation: {DOCS_URL}
"""


# ---------------------------------------------------------------------------------------- mixin
class SMPHubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for segmentation models.

    The model class needs a ``config`` dict of its constructor arguments (``SegmentationModel``
    records it automatically).
    """

    def generate_model_card(
        self,
        *args: Any,
        metrics: Any = None,
        dataset: Optional[str] = None,
        repo_id: Optional[str] = None,
        config: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> ModelCard:
        """Build the ``README.md`` model card.

        Args:
            metrics: evaluation results (a dict is shown as JSON, a string as is).
            dataset: name of the training dataset.
            repo_id: Hub repo the card is for; the loading snippet uses it (else a placeholder).
            config: constructor arguments to show (defaults to the config ``save_pretrained``
                writes).
        """
        from huggingface_hub import ModelCard, ModelCardData

        own_config = dict(getattr(self, "config", {}) or {})
        source_weights = own_config.get("encoder_weights")  # what the encoder started from
        config = _config_to_save(self, config)
        tags = list(dict.fromkeys([*(kwargs.get("tags") or []), *CARD_TAGS]))
        card_data = ModelCardData(
            language=["python"],
            library_name=LIBRARY_NAME,
            license="mit",
            pipeline_tag="image-segmentation",
            tags=tags,
        )
        body = _card_text(
            model_name=type(self).__name__,
            config=config,
            load_from=repo_id or "<save-directory-or-repo-id>",
            metrics=metrics,
            dataset=dataset,
            source_weights=source_weights,
        )
        return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")

    def save_pretrained(
        self,
        save_directory: PathLike,
        *,
        config: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
        push_to_hub: bool = False,
        model_card_kwargs: Optional[Dict[str, Any]] = None,
        dataset: Optional[str] = None,
        metrics: Any = None,
        **push_to_hub_kwargs: Any,
    ) -> Optional[str]:
        """Write ``config.json``, ``model.safetensors`` and a ``README.md`` model card.

        Args:
            save_directory: folder to write (created if needed; files in it are overwritten, except
                an existing ``README.md``).
            config: constructor arguments to write instead of ``self.config``.
            repo_id: Hub repo for ``push_to_hub=True`` (defaults to the folder name).
            push_to_hub: also upload the folder (see :meth:`push_to_hub`).
            model_card_kwargs: extra arguments of :meth:`generate_model_card`.
            dataset: training dataset name, shown in the model card.
            metrics: evaluation results, shown in the model card.
            **push_to_hub_kwargs: forwarded to :meth:`push_to_hub`.

        Returns:
            The commit URL when pushing, else ``None``.
        """
        from safetensors.torch import save_model

        save_directory = Path(save_directory)
        config_to_write = _config_to_save(self, config)  # validate before writing anything
        card_kwargs = dict(model_card_kwargs or {})
        if dataset is not None:
            card_kwargs["dataset"] = dataset
        if metrics is not None:
            card_kwargs["metrics"] = metrics
        card_kwargs.setdefault("config", config_to_write)

        save_directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(save_directory / SAFETENSORS_NAME))  # type: ignore[arg-type]
        (save_directory / CONFIG_NAME).write_text(json.dumps(config_to_write, sort_keys=True, indent=2))
        card_path = save_directory / MODEL_CARD_NAME
        if not card_path.exists():  # a hand-written card is kept
            self.generate_model_card(**card_kwargs).save(str(card_path))

        if push_to_hub:
            card_kwargs.pop("config", None)
            return self.push_to_hub(
                repo_id or save_directory.name,
                config=config,
                model_card_kwargs=card_kwargs,
                **push_to_hub_kwargs,
            )
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        config: Optional[Dict[str, Any]] = None,
        commit_message: str = "Push model using huggingface_hub.",
        private: Optional[bool] = None,
        token: Optional[str] = None,
        branch: Optional[str] = None,
        create_pr: Optional[bool] = None,
        allow_patterns: Optional[Union[List[str], str]] = None,
        ignore_patterns: Optional[Union[List[str], str]] = None,
        delete_patterns: Optional[Union[List[str], str]] = None,
        model_card_kwargs: Optional[Dict[str, Any]] = None,
        dataset: Optional[str] = None,
        metrics: Any = None,
    ) -> str:
        """Save the model to a temporary folder and upload it to a Hugging Face Hub model repo.

        The repo is created if needed (``private`` applies only then). Arguments are those of
        ``huggingface_hub.HfApi.upload_folder``; ``dataset`` and ``metrics`` go to the model card.

        Returns:
            The URL of the commit.
        """
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            self.save_pretrained(
                folder, config=config, model_card_kwargs=card_kwargs, dataset=dataset, metrics=metrics
            )
            return api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=folder,
                commit_message=commit_message,
                revision=branch,
                create_pr=create_pr,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
                delete_patterns=delete_patterns,
            )

    @classmethod
    def from_pretrained(
        cls: Type[T],
        pretrained_model_name_or_path: PathLike,
        *,
        force_download: bool = False,
        token: Optional[Union[str, bool]] = None,
        cache_dir: Optional[PathLike] = None,
        local_files_only: bool = False,
        revision: Optional[str] = None,
        map_location: Union[str, torch.device] = "cpu",
        strict: bool = False,
        **model_kwargs: Any,
    ) -> T:
        """Build this class from a saved folder or Hub repo and load its weights.

        Constructor arguments come from ``config.json``; ``model_kwargs`` override them (e.g.
        ``classes=5`` with ``strict=False`` to fine-tune on other labels: weights whose shape no
        longer fits are skipped with a warning). Encoder weights are never downloaded: the saved
        weights replace them. The model is returned in eval mode on ``map_location``.

        Args:
            pretrained_model_name_or_path: folder written by :meth:`save_pretrained`, or a Hub
                repo id (``"username/model-name"``).
            force_download, token, cache_dir, local_files_only, revision: Hub download options
                (see ``huggingface_hub.hf_hub_download``).
            map_location: device for the returned model.
            strict: require every weight to match (SMP's default for this classmethod is
                ``False``; ``smp.from_pretrained`` defaults to ``True``).
            **model_kwargs: constructor arguments overriding the saved config.
        """
        model_id = os.fspath(pretrained_model_name_or_path)
        hub_kwargs = dict(
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        config_path = _resolve_file(model_id, CONFIG_NAME, hub_kwargs, required=False)
        config: Dict[str, Any] = {}
        if config_path is None:
            warnings.warn(
                f"No {CONFIG_NAME} in {model_id!r}: building {cls.__name__} from default arguments "
                "and the ones you passed.",
                stacklevel=2,
            )
        else:
            config = _read_config(config_path)
            _check_model_class(cls, config.get(MODEL_CLASS_KEY), model_id)

        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        if "encoder_weights" in _init_parameters(cls):
            kwargs["encoder_weights"] = None  # the checkpoint replaces them: never download
        kwargs.update(model_kwargs)

        weights_path = _resolve_file(model_id, SAFETENSORS_NAME, hub_kwargs, required=False)
        if weights_path is None:
            weights_path = _resolve_file(model_id, PYTORCH_WEIGHTS_NAME, hub_kwargs, required=False)
        if weights_path is None:
            raise FileNotFoundError(
                f"No weights ({SAFETENSORS_NAME} or {PYTORCH_WEIGHTS_NAME}) found in {model_id!r}."
            )
        state = _load_weights_file(weights_path, map_location)
        # The checkpoint overwrites (nearly) every tensor: build without drawing random values and
        # initialise afterwards only what it did not load (a new head with strict=False...). Our own
        # classes only: a subclass written by a user is built as it always was.
        with init.skip_fills() if init.is_own(cls) else contextlib.nullcontext() as skipped:
            model = cls(**kwargs)
        loaded = _load_into(model, state, strict=strict, source=repr(model_id))  # type: ignore[arg-type]
        if skipped is not None:
            skipped.run_uncovered(model, loaded)  # type: ignore[arg-type]
        model.to(map_location)  # type: ignore[attr-defined]
        model.eval()  # type: ignore[attr-defined]
        return model


def _init_parameters(cls: type) -> Dict[str, Any]:
    import inspect

    return dict(inspect.signature(cls.__init__).parameters)


def _architecture_names() -> List[str]:
    from .. import _ARCHITECTURES

    return list(_ARCHITECTURES)


def _architecture(name: Optional[str]) -> Optional[type]:
    """The SMP architecture class called ``name`` (imported on demand), or ``None``."""
    if name not in _architecture_names():
        return None
    import segmentation_models_pytorch as smp

    return getattr(smp, name)


def _check_model_class(cls: type, saved_name: Optional[str], model_id: str) -> None:
    """Refuse to load one architecture's folder into another (the error would be a key soup)."""
    if not saved_name or saved_name == cls.__name__:
        return
    saved = _architecture(saved_name)
    if saved is not None and not (issubclass(cls, saved) or issubclass(saved, cls)):
        raise ValueError(
            f"{model_id!r} holds a {saved_name} model, not a {cls.__name__}. Load it with "
            f"smp.from_pretrained(...) or smp.{saved_name}.from_pretrained(...)."
        )


def from_pretrained(
    pretrained_model_name_or_path: PathLike,
    *,
    force_download: bool = False,
    token: Optional[Union[str, bool]] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: bool = False,
    revision: Optional[str] = None,
    strict: bool = True,
    **model_kwargs: Any,
) -> nn.Module:
    """Load any architecture saved with ``save_pretrained`` or pushed with ``push_to_hub``.

    The architecture is read from ``config.json`` (``_model_class``); everything else is as in
    :meth:`SMPHubMixin.from_pretrained`, e.g.::

        model = smp.from_pretrained("path/or/user-repo")
        model = smp.from_pretrained("path/or/user-repo", classes=5, strict=False)  # new head

    Args:
        pretrained_model_name_or_path: folder written by ``save_pretrained`` or a Hub repo id.
        force_download, token, cache_dir, local_files_only, revision: Hub download options
            (see ``huggingface_hub.hf_hub_download``).
        strict: require every saved weight to fit the rebuilt model (default ``True``).
        **model_kwargs: ``map_location`` and constructor arguments overriding the saved config.
    """
    model_id = os.fspath(pretrained_model_name_or_path)
    hub_kwargs = dict(
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        token=token,
        local_files_only=local_files_only,
    )
    config_path = _resolve_file(model_id, CONFIG_NAME, hub_kwargs)
    config = _read_config(config_path)  # type: ignore[arg-type]
    name = config.get(MODEL_CLASS_KEY)
    model_class = _architecture(name)
    if model_class is None:
        from .._errors import unknown_name

        if name is None:
            raise ValueError(
                f"{config_path} has no {MODEL_CLASS_KEY!r} entry, so the architecture is unknown. Load it "
                "with the class instead, e.g. smp.Unet.from_pretrained(...)."
            )
        raise unknown_name(
            f"model class (from {MODEL_CLASS_KEY} in {config_path}; for your own subclasses call "
            "YourClass.from_pretrained)",
            name,
            _architecture_names(),
        )
    return model_class.from_pretrained(model_id, strict=strict, **hub_kwargs, **model_kwargs)
