"""The one place that configures PyTensor: C backend, BLAS, float type, compile cache.

PyTensor from PyPI links no BLAS; netbuild points it at the OpenBLAS that the
``scipy-openblas32`` wheel ships (its symbols carry a ``scipy_`` prefix, mapped here with
``-D`` defines). A user's own ``blas__ldflags`` (in ``PYTENSOR_FLAGS`` or ``.pytensorrc``) wins.
Import this module before anything else touches PyTensor; :func:`configure` is idempotent.
"""

from __future__ import annotations

import configparser
import os
import warnings
from pathlib import Path

from .errors import UsageError

#: The BLAS routines PyTensor's C code calls (real types only; netbuild uses no complex maths).
_BLAS_ROUTINES = [p + r for r in ("gemm", "gemv", "ger", "dot", "axpy", "scal", "copy",
                                  "syrk", "trsm") for p in "sd"]

#: OpenBLAS's own functions that netbuild's C ops call (``netbuild_serial_blas``, ops/blas.c).
_OPENBLAS_FUNCTIONS = ("set_num_threads", "get_num_threads")

_configured = False
_blas_source = "none"

#: Added to g++'s flags unless the user sets ``gcc__cxxflags``: no debug information (``-g0``
#: after PyTensor's ``-g``), pipes instead of temporary files.
COMPILE_FLAGS = "-g0 -pipe"

#: Graph rewrites left out of the compile mode. ``local_softmax_stabilize``: PyTensor 3.0 turns
#: ``exp(x) / sum(exp(x))`` back into its own Softmax op, which has no C code and runs in Python.
#: ``local_dot22_to_dot22scalar``: it folds ``0.1 * dot(x.T, g)`` into a second matrix product
#: even when ``dot(x.T, g)`` is still needed, so Adam's ``(1 - beta1) * grad`` and ``grad ** 2``
#: computed every weight gradient twice (an MLP step spent 20% of its time on the copies).
EXCLUDED_REWRITES = ("local_softmax_stabilize", "local_dot22_to_dot22scalar")

_modes: dict[bool, object] = {}

#: The backends a graph compiles with: ``c`` (PyTensor's C virtual machine and netbuild's C ops)
#: or ``jax`` (PyTensor's JAX linker: ``jax.jit`` on the CPU or a GPU, netbuild's ops by their
#: JAX implementations).
BACKENDS = ("c", "jax")
BACKEND_ENV = "NETBUILD_BACKEND"
_backend = "c"


class BackendError(UsageError):
    """A backend that is not one of :data:`BACKENDS` (exit code 2, as a usage error)."""


def resolve(requested: str | None = None) -> str:
    """``requested`` (``--backend``), else ``NETBUILD_BACKEND``, else ``c``. Raises
    :class:`BackendError` for another name."""
    name = requested or os.environ.get(BACKEND_ENV) or "c"
    if name not in BACKENDS:
        where = "--backend" if requested else BACKEND_ENV
        raise BackendError(f"{where}={name!r}: expected one of: {', '.join(BACKENDS)}")
    return name


def use(name: str) -> str:
    """Compile every later graph with backend ``name`` (:data:`BACKENDS`); with ``jax``, JAX must
    be installed (a :class:`netbuild.errors.MissingExtra` says so otherwise)."""
    global _backend
    if name == "jax":
        jax_modules()
    _backend = name
    return name


def current() -> str:
    return _backend


def jax_modules():
    """``jax`` with PyTensor's JAX dispatch, netbuild's ops registered with it; or a
    :class:`netbuild.errors.MissingExtra` that says how to install JAX."""
    try:
        import jax
        from pytensor.link.jax.dispatch import jax_funcify
    except ImportError:
        from .errors import MissingExtra

        raise MissingExtra("jax", "jax", "the jax backend (--backend jax)") from None
    from .ops import NetbuildCOp

    if NetbuildCOp not in jax_funcify.registry:
        jax.config.update("jax_enable_x64", True)  # float64 graphs, int64 class ids and counters

        @jax_funcify.register(NetbuildCOp)
        def _netbuild_op(op, node=None, **kwargs):
            return _typed(op.jax(node), node)

        from pytensor.tensor.elemwise import CAReduce

        careduce = jax_funcify.dispatch(CAReduce)

        @jax_funcify.register(CAReduce)
        def _careduce(op, node=None, **kwargs):
            # PyTensor 3.0's JAX reduction returns its accumulator's dtype (a float32 sum comes back
            # float64), which a scan's carry refuses: the node's own dtype, as on the c backend
            return _typed(careduce(op, node=node, **kwargs), node)

        _register_static_shapes()
    return jax


def ahead_on_device(batches):
    """``(index, arrays)`` of ``batches``, each batch's arrays put on JAX's device one step ahead:
    ``jax.device_put`` returns at once and copies while the step on the batch before runs."""
    import jax

    pending = None
    try:
        for idx, arrays in batches:
            placed = (idx, [jax.device_put(a) for a in arrays])
            if pending is not None:
                yield pending
            pending = placed
        if pending is not None:
            yield pending
    finally:  # a step that raised: the batches' generator is closed too
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _typed(fn, node):
    """``fn`` on inputs and outputs of the dtypes the node declares: PyTensor's JAX code may hand
    an op a wider array than its graph says (a float32 sum accumulated in float64, say)."""
    ins = [getattr(v.type, "dtype", None) for v in node.inputs]
    outs = [o.type.dtype for o in node.outputs]

    def cast(value, dtype):
        return value.astype(dtype) if dtype and getattr(value, "dtype", dtype) != dtype else value

    def typed(*args):
        result = fn(*(cast(a, d) for a, d in zip(args, ins)))
        if isinstance(result, tuple):
            return tuple(cast(r, d) for r, d in zip(result, outs))
        return cast(result, outs[0])

    return typed


def _register_static_shapes() -> None:
    """A rewrite of the ``jax`` phase: the shape inputs of netbuild's ops
    (:attr:`netbuild.ops.NetbuildCOp.shape_inputs`, e.g. dropout's ``x.shape``) become tuples of
    the dimensions, static under ``jax.jit``, as PyTensor does for its random variables' sizes."""
    from pytensor.compile import optdb
    from pytensor.graph.rewriting.basic import in2out, node_rewriter
    from pytensor.link.jax.dispatch.shape import JAXShapeTuple
    from pytensor.tensor.basic import MakeVector

    from .ops import NetbuildCOp

    @node_rewriter([NetbuildCOp])
    def shape_inputs_as_tuples(fgraph, node):
        inputs, changed = list(node.inputs), False
        for i in node.op.shape_inputs:
            owner = inputs[i].owner
            if owner is not None and isinstance(owner.op, MakeVector):
                inputs[i], changed = JAXShapeTuple()(*owner.inputs), True
        return node.clone_with_new_inputs(inputs).outputs if changed else None

    optdb.register("netbuild_shape_inputs_as_tuples", in2out(shape_inputs_as_tuples), "jax", position=100)


def mode(keep_outputs: bool = False):
    """The compile mode: PyTensor's C virtual machine (its default since 3.0 is Numba, which
    compiles these graphs far slower) with the "fast_run" rewrites but not
    :data:`EXCLUDED_REWRITES`, linked by :class:`netbuild.linker.ParallelCVMLinker`.

    With ``keep_outputs`` (the training step, called thousands of times on batches of one size),
    every node keeps its outputs between calls and the ops reuse them: freeing them made every
    step allocate its large buffers again, each page faulted in and zeroed by the kernel (the
    bench LSTM trained 1.2x faster on 2 threads without that), at the price of all of a step's
    intermediates staying allocated. Without it (evaluation, prediction), each is freed once read.
    A user's own ``allow_gc`` wins over both.

    With the ``jax`` backend (:func:`use`), PyTensor's JAX mode: one ``jax.jit`` function."""
    if _backend == "jax":
        return "JAX"
    if keep_outputs not in _modes:
        import pytensor
        from pytensor.compile.mode import Mode

        from .linker import ParallelCVMLinker
        from .ops import dense

        _remember_march_flags()
        allow_gc = pytensor.config.allow_gc if _user_set("allow_gc") else not keep_outputs
        _modes[keep_outputs] = Mode(ParallelCVMLinker(use_cloop=True, allow_gc=allow_gc),
                                    "fast_run").excluding(*EXCLUDED_REWRITES).including(dense.TAG)
    return _modes[keep_outputs]


def _cpu_signature() -> str:
    """The compiler and this CPU's model and feature flags: what g++'s ``-march=native`` sees."""
    import hashlib

    import pytensor

    text = pytensor.config.cxx + pytensor.config.gcc__cxxflags
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text += "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return ""  # no way to tell one CPU from another: detect every time
    return hashlib.sha256(text.encode()).hexdigest()


def _remember_march_flags() -> None:
    """Skip PyTensor's per-process detection of g++'s flags for this CPU (it compiles and runs
    test programs: about a second of every compile) by keeping its result in the compile cache."""
    import json

    from pytensor.link.c.cmodule import GCC_compiler

    signature = _cpu_signature()
    if not signature or GCC_compiler.march_flags is not None:
        return
    memo = Path(compiledir()) / "netbuild-march-flags.json"
    try:
        saved = json.loads(memo.read_text())
        if saved.get("signature") == signature and isinstance(saved.get("flags"), list):
            GCC_compiler.march_flags = [str(f) for f in saved["flags"]]
            return
    except (OSError, ValueError, AttributeError):
        pass
    GCC_compiler.compile_args()  # detects them once
    if GCC_compiler.march_flags is None:
        return
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"signature": signature, "flags": GCC_compiler.march_flags}))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache: detect again next time


def _user_set(flag: str) -> bool:
    if flag in os.environ.get("PYTENSOR_FLAGS", ""):
        return True
    rc_files = os.environ.get("PYTENSORRC", str(Path.home() / ".pytensorrc")).split(os.pathsep)
    parser = configparser.ConfigParser()
    try:
        parser.read([os.path.expanduser(f) for f in rc_files])
    except configparser.Error:
        return False
    section, _, option = flag.partition("__")
    return parser.has_option("global", flag) or parser.has_option(section, option)


def openblas_ldflags() -> str | None:
    """Link flags for the scipy-openblas32 wheel's OpenBLAS, or None when it is not installed."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    lib_dir = scipy_openblas32.get_lib_dir()
    lib = scipy_openblas32.get_library()
    defines = " ".join([f"-D{n}_=scipy_{n}_" for n in _BLAS_ROUTINES]
                       + [f"-Dopenblas_{f}=scipy_openblas_{f}" for f in _OPENBLAS_FUNCTIONS])
    return f"-L{lib_dir} -l{lib} -Wl,-rpath,{lib_dir} {defines}"


def configure(float_type: str = "float32") -> None:
    """Set PyTensor's BLAS and float type once per process (a user's own flags win)."""
    global _configured, _blas_source
    if _configured:
        return
    import pytensor

    if not _user_set("floatX"):
        pytensor.config.floatX = float_type
    if not _user_set("gcc__cxxflags"):
        # PyTensor runs g++ with -g; debug information was a third of a small module's compile
        # time (0.95 s against 0.68 s), and about 40 modules make a cold compile.
        pytensor.config.gcc__cxxflags = f"{pytensor.config.gcc__cxxflags} {COMPILE_FLAGS}".strip()
    # Every core by default (netbuild.threads); a bad NETBUILD_THREADS is reported by the command
    # that reads it, in one line, so here it falls back to the cores.
    from . import threads

    try:
        threads.apply(threads.resolve())
    except threads.ThreadsError:
        threads.apply(threads.available_cores())
    if _user_set("blas__ldflags"):
        _blas_source = "user (PYTENSOR_FLAGS or .pytensorrc)"
    else:
        flags = openblas_ldflags()
        if flags is not None:
            pytensor.config.blas__ldflags = flags
            _blas_source = "scipy-openblas32"
        else:
            _blas_source = "none"
    # PyTensor warns at import about numpy/BLAS choices netbuild has made on purpose.
    warnings.filterwarnings("ignore", message=".*could not link to a BLAS.*")
    _configured = True


def blas_source() -> str:
    """Where the BLAS in use came from: ``scipy-openblas32``, ``user ...`` or ``none``."""
    return _blas_source


def blas_core() -> str:
    """The kernels scipy-openblas32 runs on this CPU (OpenBLAS's core name, e.g. ``SkylakeX``),
    with ``OPENBLAS_CORETYPE`` when the environment forces them; ``-`` when netbuild computes with
    another BLAS (the user's ``blas__ldflags``) or none."""
    import ctypes

    from . import threads

    lib = threads.openblas()
    if _blas_source != "scipy-openblas32" or lib is None:
        return "-"
    corename = lib.scipy_openblas_get_corename
    corename.restype = ctypes.c_char_p
    core = corename().decode()
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return f"{core} (OPENBLAS_CORETYPE={forced})" if forced else core


def float_type() -> str:
    import pytensor

    return pytensor.config.floatX


def compiledir() -> str:
    import pytensor

    return pytensor.config.compiledir


def compile_cache() -> tuple[str, int, int]:
    """PyTensor's compile cache: its folder, the number of compiled modules and its size in bytes."""
    root = Path(compiledir())
    modules, size = 0, 0
    if root.is_dir():
        for path in root.rglob("*"):
            if path.is_file():
                size += path.stat().st_size
                modules += path.suffix == ".so"
    return str(root), modules, size


def _threads_info() -> dict:
    from . import threads

    info = threads.describe()
    return {"threads": info["threads"], "available_cores": info["available_cores"],
            "cpus": info["cpus"], "blas_threads": info["blas_threads"],
            "threads_env": info["env"] or "(not set)"}


def describe() -> dict:
    """What netbuild computes with: versions, mode, float type, BLAS, threads, compile cache."""
    import platform

    import numpy
    import pytensor

    cache, modules, size = compile_cache()
    return {
        "python": platform.python_version(),
        "pytensor": pytensor.__version__,
        "numpy": numpy.__version__,
        "mode": (f"CVM (C backend), without {', '.join(EXCLUDED_REWRITES)}" if current() == "c"
                 else "JAX (PyTensor's JAX linker, jax.jit)"),
        "float_type": float_type(),
        "compile_flags": f"-O3 {pytensor.config.gcc__cxxflags}".strip(),
        "blas": blas_source(),
        "blas_flags": pytensor.config.blas__ldflags or "(none)",
        "blas_core": blas_core(),
        **_threads_info(),
        "compile_cache": cache,
        "compiled_modules": modules,
        "compile_cache_bytes": size,
        "backend": current(),
        "jax": jax_devices(),
    }


def jax_devices() -> str:
    """JAX's version and devices with their memory (``jax 0.10.2: cpu:0, cuda:0 (79.1 GiB)``), or
    how to install it; JAX is imported only to say this."""
    import importlib.util

    if importlib.util.find_spec("jax") is None:
        return "not installed (pip install 'netbuild[jax]' for --backend jax)"
    try:
        import jax

        devices = jax.devices()
    except Exception as exc:  # a broken jaxlib, a platform asked for that is not there
        return f"installed, but not usable: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    shown = []
    for device in devices:
        memory = ""
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
            memory = f" ({limit / 2**30:,.1f} GiB)" if limit else ""
        except Exception:  # the CPU's has none
            pass
        shown.append(f"{device.platform}:{device.id}{memory}")
    return f"jax {jax.__version__}: {', '.join(shown)}"
