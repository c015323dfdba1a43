"""netbuild: a declarative network builder on the command line (YAML -> PyTensor -> trained model).

The Python API (:mod:`netbuild.api`, which the CLI is built on)::

    import netbuild
    spec = netbuild.load_spec("net.yaml", overrides=["train.epochs=3"])
    netbuild.check(spec)
    run = netbuild.train(spec, run_dir="runs/net")
    model = netbuild.load_model("runs/net")
    model.predict(x); model.evaluate(x, y); model.export_onnx("net.onnx")
    netbuild.savez("train-00.npz", x=x, y=y)  # a data file whose batches are read in place

A user's mistake raises :class:`NetbuildError`, whose ``str()`` is the located line the CLI prints.
Importing netbuild configures PyTensor once (C backend, BLAS, float type); see ``backend``.
"""

__version__ = "0.1.0"

from . import threads as _threads  # noqa: E402

_threads.wait_policy()  # before numpy loads its OpenBLAS

from . import backend as _backend  # noqa: E402

_backend.configure()

from .errors import (  # noqa: E402
    DataError,
    MissingExtra,
    NetbuildError,
    RunError,
    SpecError,
    UsageError,
)

#: The API's names, imported from :mod:`netbuild.api` when first used (the CLI's start stays fast).
_API = ("load_spec", "check", "train", "load_model", "savez", "Model", "Run", "Summary", "Callbacks")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'netbuild' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))


__all__ = ["__version__", "NetbuildError", "SpecError", "DataError", "RunError", "UsageError",
           "MissingExtra", *_API]
