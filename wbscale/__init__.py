"""wbscale: distributed training of white-box (CRATE) language models."""

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for a package whose public names ``{name: submodule}`` are
    imported on first use, so importing the package itself stays cheap::

        __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
    """
    import importlib
    import sys

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
