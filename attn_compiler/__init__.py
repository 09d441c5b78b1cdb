"""attn_compiler: a torch.compile backend that fuses hand-written attention.

Public API::

    model = torch.compile(model, backend="attn_compiler")          # via entry point
    model = torch.compile(model, backend=attn_compiler.backend(inner="aot_eager"))
    print(attn_compiler.report())                                  # one row per site
    attn_compiler.reset()                                          # forget recorded sites

Importing this package does no work: the backend, the passes and the kernels
are imported on first use, and no global configuration is changed.

[Note] Two public names are also submodules. ``attn_compiler.report`` is the
module ``report.py``, made callable (``report()`` gives the site table), so both
``attn_compiler.report()`` and ``attn_compiler.report.record(...)`` work.
``attn_compiler.backend`` is a function: the package keeps it bound when the
submodule ``backend.py`` is imported (lazily, on first call); reach that
module's names with ``from attn_compiler.backend import ...``.
"""
from __future__ import annotations

import os as _os
import sys as _sys
import types as _types
from typing import Any, Callable

from . import report  # stdlib only: cheap; a callable module (see the note above)
from .report import Report, Site, reset

__version__ = "0.1.0"
__all__ = ["backend", "report", "reset", "Report", "Site", "__version__"]


def backend(inner: str = "inductor", example_inputs=None, **options: Any) -> Callable:
    """A torch.compile backend: fuse attention sites, then compile with ``inner``.

    ``inner`` is ``"inductor"``, ``"aot_eager"`` or ``"eager"``; ``options`` are
    passed on to :func:`attn_compiler.backend.backend`.  Given as the backend
    itself (``torch.compile(m, backend=attn_compiler.backend)``), it is the
    default backend.
    """
    from .backend import backend as _backend

    return _backend(inner, example_inputs, **options)


_PUBLIC_FUNCTIONS = {"backend": backend}


class _Package(_types.ModuleType):
    """This package's module type: importing the submodule ``backend`` does not
    rebind the public function of the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC_FUNCTIONS and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def _add_source_checkout_root() -> None:
    """Source checkout used without installing (``PYTHONPATH=.``): make the root
    folders ``passes/`` and ``templates/`` the subpackages ``attn_compiler.passes``
    and ``attn_compiler.templates``. An install maps them itself (pyproject.toml);
    this only adds the root when nothing installed provides them."""
    import importlib.util

    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if not _os.path.isfile(_os.path.join(root, "passes", "__init__.py")):
        return
    if not _os.path.isfile(_os.path.join(root, "pyproject.toml")):
        return
    if importlib.util.find_spec(__name__ + ".passes") is None:
        __path__.append(root)  # noqa: F821  (the package's own search path)


_add_source_checkout_root()
