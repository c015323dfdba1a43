"""PyTensor ops that netbuild writes itself, in C, where a composition of PyTensor's own ops is
too slow: :mod:`netbuild.ops.update` (fused optimizer steps), :mod:`netbuild.ops.random`
(counter-based uniform draws for dropout), :mod:`netbuild.ops.embedding` (the embedding's
lookup and its gradient), :mod:`netbuild.ops.recurrent` (the recurrent layers'
loop over timesteps and its gradient), :mod:`netbuild.ops.projection` (the gradient of their
inputs), :mod:`netbuild.ops.conv` (convolution as im2col + BLAS
gemm, and its gradients), :mod:`netbuild.ops.pool` (max and average pooling, and their
gradient), :mod:`netbuild.ops.normalization` (layer_norm and its gradient) and
:mod:`netbuild.ops.softmax` (softmax and softmax cross-entropy, and their gradients).

Every op here derives from :class:`NetbuildCOp`, PyTensor's ``ExternalCOp``: its C lives in a
``.c`` file beside its module, cut into ``#section`` blocks, after the glue every op shares
(``netbuild.c``: threads, slices, outputs, the node's scratch buffer, shape checks; and for ops
that call BLAS, ``blas.c``). The Python side of each op writes only its call: :class:`CCall`
writes what every call repeats (contiguous inputs, checked shapes, allocated outputs, the scratch,
the kernel without the GIL, the cleanup). The compile cache keys each module by a hash of all of
that text, C files and Python glue, so an edit can never run a stale module.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import numpy as np
from pytensor.graph.basic import Apply
from pytensor.link.c.op import ExternalCOp
from pytensor.tensor.basic import get_underlying_scalar_constant_value
from pytensor.tensor.exceptions import NotScalarConstantError
from pytensor.tensor.blas import ldflags
from pytensor.tensor.blas_headers import blas_header_text, blas_header_version
from pytensor.utils import hash_from_code

HERE = Path(__file__).resolve().parent

#: The C types and type numbers of the float types the ops compute in.
CTYPES = {"float32": "npy_float32", "float64": "npy_float64"}
TYPENUMS = {"float32": "NPY_FLOAT32", "float64": "NPY_FLOAT64"}


class _Sections(ExternalCOp):
    """Only to parse files with ``ExternalCOp.load_c_code``; never an op."""

    def perform(self, node, inputs, output_storage):
        raise NotImplementedError


@functools.cache
def _load_file(name: str) -> tuple[str, dict[str, str]]:
    """The text of one file beside this module and its ``#section`` blocks, parsed by
    PyTensor's own ``ExternalCOp.load_c_code``: read once per process, so that an op's cache key
    (a hash of the texts) and the source it compiles always come from the same read."""
    holder = _Sections.__new__(_Sections)
    holder.func_codes, holder.code_sections = [], {}
    ExternalCOp.load_c_code(holder, [HERE / name])
    return holder.func_codes[0], holder.code_sections


@functools.cache
def _load(files: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The texts of ``files`` and their ``#section`` blocks, each section joined in file order
    (as ``ExternalCOp.load_c_code`` joins them)."""
    codes, sections = [], {}
    for name in files:
        text, parts = _load_file(name)
        codes.append(text)
        for section, code in parts.items():
            sections[section] = sections.get(section, "") + code
    return tuple(codes), sections


def _with_static_shapes(make_node):
    """``make_node``, whose outputs get the static shapes their op's ``infer_shape`` gives when
    the inputs' shapes are static, on the ``jax`` backend: every shape a graph computes from them
    is then a constant, as ``jax.jit`` needs (on the C backend the graphs stay as they were)."""

    @functools.wraps(make_node)
    def make_static_node(self, *args, **kwargs):
        node = make_node(self, *args, **kwargs)
        from .. import backend

        if backend.current() != "jax":
            return node
        shapes = [getattr(v.type, "shape", None) for v in node.inputs]
        if any(s is None or None in s for s in shapes):
            return node
        try:
            found = self.infer_shape(None, node, [tuple(int(d) for d in s) for s in shapes])
        except Exception:  # a shape that needs an input's value (a shape input): left as it is
            return node
        outputs = []
        for out, dims in zip(node.outputs, found):
            static = tuple(_constant(d) for d in dims)
            outputs.append(out.type.clone(shape=static)())
        return Apply(self, node.inputs, outputs)

    return make_static_node


def _constant(dim) -> int | None:
    if isinstance(dim, (int, np.integer)):
        return int(dim)
    try:
        return int(get_underlying_scalar_constant_value(dim))
    except NotScalarConstantError:
        return None


class NetbuildCOp(ExternalCOp):
    """Base of netbuild's C ops: PyTensor's ``ExternalCOp`` on ``netbuild.c`` and the op's own
    :attr:`c_file`, compiled with OpenMP.

    The files are read once per class, not per instance (``ExternalCOp.__init__`` is not called:
    the class alone says which files it uses). The compile-cache version is a hash of the C
    files and of the Python modules that write the op's call (:meth:`c_code_cache_version`).
    """

    #: The op's own C file, beside its module (e.g. ``"conv.c"``).
    c_file: str = ""
    #: The shared files loaded before it.
    shared_files: tuple[str, ...] = ("netbuild.c",)
    #: Flags the op's C needs beyond OpenMP's.
    extra_compile_args: tuple[str, ...] = ()
    #: The inputs that are shapes (of an output to make): static dimensions under ``jax.jit``.
    shape_inputs: tuple[int, ...] = ()
    func_name = None
    _cop_num_inputs = None
    _cop_num_outputs = None

    def __init__(self):  # the class says which files: nothing to load per instance
        pass

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "make_node" in cls.__dict__:
            cls.make_node = _with_static_shapes(cls.__dict__["make_node"])

    @classmethod
    def c_files(cls) -> tuple[str, ...]:
        return (*cls.shared_files, cls.c_file)

    @property
    def func_files(self) -> list[Path]:
        return [HERE / f for f in self.c_files()]

    @property
    def func_codes(self) -> list[str]:
        return list(_load(self.c_files())[0])

    @property
    def code_sections(self) -> dict[str, str]:
        return _load(self.c_files())[1]

    @classmethod
    @functools.cache
    def _glue_hash(cls) -> str:
        """A hash of the Python that writes the op's C: the modules of its classes in
        ``netbuild.ops``, this one included."""
        sources = sorted({inspect.getsourcefile(k) for k in cls.__mro__
                          if k.__module__.startswith("netbuild.ops")})
        return hash_from_code("\n".join(Path(s).read_text(encoding="utf-8") for s in sources))

    def c_code_cache_version(self):
        return (hash_from_code("\n".join(self.func_codes)), self._glue_hash(),
                *super().c_code_cache_version()[1:])

    def c_support_code(self, **kwargs):
        """Each file's support code as its own string: PyTensor keeps one copy of a string that
        several ops of a module share (the glue), where one joined string would define it twice."""
        codes = (_load((f,))[1].get("support_code", "") for f in self.c_files())
        return [c for c in codes if c.strip()]

    def c_compile_args(self, **kwargs):
        return ["-fopenmp", *self.extra_compile_args]

    def c_libraries(self, **kwargs):
        return ["gomp"]

    def c_code(self, node, name, inputs, outputs, sub):  # each op writes its own call
        raise NotImplementedError

    def jax(self, node):
        """The op as a JAX function of its inputs (one output, or a tuple of them), for the
        ``jax`` backend (:func:`netbuild.backend.jax_modules` registers it with PyTensor's
        ``jax_funcify``). Each op writes its own, beside its C."""
        raise NotImplementedError(f"{type(self).__name__} has no JAX implementation yet")


class BlasCOp(NetbuildCOp):
    """A netbuild op whose C calls BLAS (``netbuild_gemm`` of ``blas.c``), linked the way
    PyTensor's own Gemm ops are (``blas__ldflags``, see :mod:`netbuild.backend`)."""

    shared_files = ("netbuild.c", "blas.c")

    def c_support_code(self, **kwargs):
        return [blas_header_text(), *super().c_support_code(**kwargs)]

    def c_code_cache_version(self):
        return (*super().c_code_cache_version(), *blas_header_version())

    def c_libraries(self, **kwargs):
        return [*ldflags(), *super().c_libraries()]

    def c_compile_args(self, **kwargs):
        return [*ldflags(libs=False, flags=True), *super().c_compile_args()]

    def c_lib_dirs(self, **kwargs):
        return ldflags(libs=False, libs_dir=True)

    def c_header_dirs(self, **kwargs):
        return ldflags(libs=False, include_dir=True)


class CCall:
    """The C of one call of an op's kernel, with what every call repeats written once.

    Statements run in the order they are added, each only while no error is set (``err_``):
    :meth:`check` and :meth:`check_shape` raise a ValueError naming the op; :meth:`input` makes
    an input C-contiguous; :meth:`output` allocates an output (or keeps last call's);
    :meth:`scratch` grows the node's scratch buffer; :meth:`run` runs the kernel without the GIL.
    :meth:`code` closes the block:
    the contiguous copies are released and a failure jumps to PyTensor's ``fail``.
    """

    def __init__(self, op, node, name: str, sub: dict):
        self.op = type(op).__name__
        self.name, self.sub = name, sub
        self.dtype = node.outputs[0].dtype
        self.ctype, self.typenum = CTYPES[self.dtype], TYPENUMS[self.dtype]
        self._inputs: list[str] = []
        self._lines: list[str] = []

    def line(self, code: str) -> "CCall":
        """A C statement or declaration, run whatever the error state (declarations)."""
        self._lines.append(code)
        return self

    def when_ok(self, code: str) -> "CCall":
        """A C statement run while no error is set; it may set ``err_``."""
        self._lines.append(f"if (!err_) {{ {code} }}")
        return self

    def check(self, condition: str, message: str, *args: str) -> "CCall":
        """Unless ``condition``: ValueError ``"<Op>: <message>"`` (a printf format of ``args``)."""
        fmt = ", ".join(["", *args]) if args else ""
        return self.when_ok(f"if (!({condition})) {{ PyErr_Format(PyExc_ValueError, "
                            f"\"{self.op}: {message}\"{fmt}); err_ = 1; }}")

    def check_shape(self, var: str, label: str, dims: str, nd: int | str | None = None) -> "CCall":
        """``var`` must have the shape ``dims`` (a C initializer list, e.g. ``"Tn, Bn, U"``)."""
        nd = dims.count(",") + 1 if nd is None else nd
        return self.when_ok(f"npy_intp d_[] = {{{dims}}}; err_ = netbuild_check_shape({var}, "
                            f"\"{self.op}\", \"{label}\", \"{dims}\", {nd}, d_);")

    def input(self, var: str, ctype: str | None = None) -> str:
        """``var`` made C-contiguous; returns the C expression of its data pointer."""
        i = len(self._inputs)
        self._inputs.append(var)
        self.when_ok(f"c_[{i}] = PyArray_GETCONTIGUOUS({var}); if (!c_[{i}]) err_ = 1;")
        return f"(({ctype or self.ctype}*)PyArray_DATA(c_[{i}]))"

    def output(self, var: str, dims: str, nd: int | str | None = None,
               typenum: str | None = None) -> str:
        """Allocate ``var`` with the shape ``dims``; returns the C expression of its data."""
        nd = dims.count(",") + 1 if nd is None else nd
        self.when_ok(f"npy_intp d_[] = {{{dims}}}; err_ = netbuild_output(&{var}, {nd}, d_, "
                     f"{typenum or self.typenum});")
        return f"(({self.ctype}*)PyArray_DATA({var}))"

    def updated(self, var: str, src: str, inplace: bool) -> str:
        """An output that starts as the input ``src`` and is updated by the kernel: ``src``
        itself when ``inplace`` and it is a C-ordered, writeable array; else a copy of ``src``,
        into the node's kept output (as :meth:`output` allocates it) when the op is not in place
        (an in-place op's last output may be an earlier input: a fresh array then). Returns the
        C expression of its data."""
        self.when_ok(f"if ({int(inplace)} && PyArray_IS_C_CONTIGUOUS({src}) "
                     f"&& PyArray_ISWRITEABLE({src})) {{ Py_XDECREF({var}); {var} = {src}; "
                     f"Py_INCREF({var}); }} else {{ "
                     f"if ({int(inplace)} || {var} == {src}) {{ Py_XDECREF({var}); {var} = NULL; }} "
                     f"err_ = netbuild_output(&{var}, PyArray_NDIM({src}), PyArray_DIMS({src}), "
                     f"{self.typenum}) || PyArray_CopyInto({var}, {src}); }}")
        return f"(({self.ctype}*)PyArray_DATA({var}))"

    def scratch(self, nbytes: str) -> str:
        """At least ``nbytes`` bytes of the node's scratch buffer; returns a ``char*``
        expression (``s_``)."""
        name = self.name
        self.line("char* s_ = NULL;")
        self.when_ok(f"s_ = (char*)netbuild_scratch(&scratch_{name}, &scratch_size_{name}, "
                     f"(size_t)({nbytes})); if (!s_) err_ = 1;")
        return "s_"

    def run(self, call: str) -> "CCall":
        """``call`` without the GIL."""
        return self.when_ok(f"Py_BEGIN_ALLOW_THREADS {call}; Py_END_ALLOW_THREADS")

    def code(self) -> str:
        n = max(len(self._inputs), 1)
        head = ["{", "int err_ = 0;", f"PyArrayObject* c_[{n}] = {{{', '.join(['NULL'] * n)}}};",
                f"typedef {self.ctype} T_;"]
        tail = [f"for (int i_ = 0; i_ < {n}; ++i_) Py_XDECREF(c_[i_]);",
                f"if (err_) {self.sub['fail']}", "}"]
        return "\n".join(head + self._lines + tail)
