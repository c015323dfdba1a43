"""netbuild: a declarative network builder on the command line (YAML -> PyTensor -> trained model).

Importing netbuild configures PyTensor once (C backend, BLAS, float type); see ``backend``.
"""

__version__ = "0.1.0"

from . import threads as _threads  # noqa: E402

_threads.wait_policy()  # before numpy loads its OpenBLAS

from . import backend as _backend  # noqa: E402

_backend.configure()
