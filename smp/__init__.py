"""``import smp`` is ``import segmentation_models_pytorch``: the same module objects, not copies."""

import importlib
import importlib.abc
import importlib.util
import sys

import segmentation_models_pytorch as _real

_PREFIX, _TARGET = "smp.", "segmentation_models_pytorch."


def _mirror() -> None:
    """Expose every loaded ``segmentation_models_pytorch.X`` as ``smp.X`` (incl. path aliases)."""
    for name, module in list(sys.modules.items()):
        if name.startswith(_TARGET):
            sys.modules.setdefault(_PREFIX + name[len(_TARGET) :], module)


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``smp.<sub>`` to the already-importable ``segmentation_models_pytorch.<sub>``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(_PREFIX):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(_TARGET + spec.name[len(_PREFIX) :])
        _mirror()
        return module

    def exec_module(self, module):
        pass


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
sys.modules[__name__] = _real
