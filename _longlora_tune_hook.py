"""Import hook that lets the stock ``tune`` CLI find longlora_tune's recipes and configs by name.

``longlora_tune_hook.pth`` (installed next to this module in site-packages by setup.py) imports this
module at every interpreter start-up. It only puts a tiny finder at the front of ``sys.meta_path``;
when ``torchtune._recipe_registry`` is imported later, the finder wraps that one module's loader so
that, right after the module has run, ``longlora_tune.config.tune_registry.register`` appends our entries
to its ``_ALL_RECIPES``. Nothing here imports torch or torchtune, it does nothing when torchtune is
absent, and every error is swallowed: a start-up hook must never break the interpreter.
"""

import sys

_TARGET = "torchtune._recipe_registry"
_MARKER = "_longlora_tune_registry_hook"


def _register(module: object) -> None:
    """Append our recipes to the freshly executed registry module; report, never raise, on failure."""
    try:
        from longlora_tune.config.tune_registry import register

        register(module)
    except Exception as exc:  # a broken plugin must not break torchtune
        try:
            sys.stderr.write(f"longlora_tune: could not register recipes with torchtune: {exc!r}\n")
        except Exception:  # stderr may be closed
            pass


class _RegisteringLoader:
    """Delegates to the real loader of ``torchtune._recipe_registry`` and registers after it ran."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)
        _register(module)

    def __getattr__(self, name: str) -> object:
        # get_source/get_code/is_package etc. (inspect, linecache, runpy) go to the real loader.
        return getattr(self._loader, name)


class _RegistryHookFinder:
    """Meta path finder that only answers for ``torchtune._recipe_registry``."""

    _longlora_tune_registry_hook = True

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != _TARGET:
            return None
        try:
            for finder in sys.meta_path:
                if getattr(finder, _MARKER, False) or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegisteringLoader(spec.loader)
            return spec
        except Exception:  # fall back to the normal import machinery
            return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` once; register at once if the registry is loaded."""
    try:
        if not any(getattr(f, _MARKER, False) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegistryHookFinder())
        module = sys.modules.get(_TARGET)
        if module is not None:
            _register(module)
    except Exception:  # never break interpreter start-up
        pass


install()
