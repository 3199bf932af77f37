"""torchvision, imported without loading TorchDynamo.

``import torchvision`` cost ~2.2 s on top of ``import torch`` on a 2-core machine, nearly all
of it one line: ``torchvision.ops.roi_align`` imports ``is_compile_supported`` from
``torch._dynamo.utils``, and that loads the whole of TorchDynamo. lcm never calls
``roi_align``, yet every ``lcm`` process, every spawned training run and every test
subprocess paid for it. While torchvision loads, a stand-in for ``torch._dynamo.utils``
answers that import with a function that loads the real module at its first call; any other
name asked of the stand-in loads the real module at once (so another torchvision version
stays correct, only slower). The stand-in leaves ``sys.modules`` as soon as torchvision is in;
``torch.compile`` and everything else find the real module.

lcm imports torchvision from here only (``from lcm.vision import torchvision``; an
import-linter contract in ``pyproject.toml`` enforces it).
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any

import torch  # noqa: F401 - torch first, as torchvision itself does

_DEFERRED = "torch._dynamo.utils"
_LOCK = threading.RLock()  # the stand-in's window and its swap for the real module


def _import_torchvision() -> types.ModuleType:
    if "torchvision" in sys.modules or _DEFERRED in sys.modules:
        return importlib.import_module("torchvision")
    stand_in = types.ModuleType(_DEFERRED)

    def real() -> types.ModuleType:
        with _LOCK:
            if sys.modules.get(_DEFERRED) is stand_in:
                del sys.modules[_DEFERRED]
        return importlib.import_module(_DEFERRED)

    def is_compile_supported(device_type: Any) -> bool:
        return real().is_compile_supported(device_type)

    def other(name: str) -> Any:
        if name.startswith("__"):  # the import system probing (``__path__``): not a name
            raise AttributeError(name)
        return getattr(real(), name)

    stand_in.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]
    stand_in.__getattr__ = other  # type: ignore[method-assign]
    with _LOCK:
        sys.modules[_DEFERRED] = stand_in
        try:
            return importlib.import_module("torchvision")
        finally:
            if sys.modules.get(_DEFERRED) is stand_in:
                del sys.modules[_DEFERRED]


torchvision = _import_torchvision()
