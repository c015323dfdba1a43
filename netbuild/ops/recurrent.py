"""The recurrent layers' loop over timesteps as one op in C, and its gradient as another.

:class:`RecurrentSequence` runs a whole sequence of ``simple_rnn``, ``lstm`` or ``gru`` steps
(PyTorch's equations, as in :mod:`netbuild.layers.recurrent`) in one Apply node, time-major::

    P (T, B, G*U)   every step's input projection x W_ih; or, with ``project`` (the layers' use),
                    X (T, B, F) and W_ih (F, G*U), projected a step at a time inside the loop
    b (G*U,)        the projection's bias: b_ih + b_hh (the GRU's b_hh without its n block)
    W (U, G*U)      W_hh
    h0 (B, U)       initial state; the LSTM also takes c0 (B, U), the GRU b_hn (U,)
    M (T, B)        with ``masked``: 0 where a row's step is padding, else 1

Its first output is ``H (T, B, U)``, the state after every step (the LSTM's second output is the
cell state ``C``); the others are what the gradient reads back (the gates of every step and, for
the LSTM, ``act(C)``, for the GRU ``h W_hn + b_hn``). Each step is one matrix product (``h W``,
with ``W`` packed once per call: ``packed.c``), with ``project`` a second (``x[t] W_ih``, the
product :mod:`netbuild.ops.projection` computes, row by row the same bits, while the step's rows
are in cache), and one fused, vectorized pass of elementwise maths that adds ``P[t] + b`` and
applies the gates. With ``project`` the gradient op also gives ``W_ih``'s gradient, and ``X``'s
is :mod:`netbuild.ops.projection`'s ``dP W_ih^T``.
With a mask, a padded step leaves a row's states as they were (``H[t] = H[t-1]``, and ``C``):
selected, so that whatever the padded inputs hold never reaches a state; backwards, that row's
gates get no gradient and the state's gradient passes to the step before unchanged. The mask has
no gradient.

:class:`RecurrentSequenceGrad` is backpropagation through time in C: one gemm per step for the
state's gradient (``dh += dgates W^T``); after the loop ``dW = sum_t h[t-1]^T dgates[t]`` as
products over all ``T*B`` rows (with ``project`` also ``dW_ih = sum_t x[t]^T dP[t]``, for the
simple RNN and the LSTM from the same packed blocks of rows) and the bias gradients as column
sums (in double, in row order).
It has no gradient of its own (no second derivatives).

Threads: both ops split the rows of the batch (at least a tile of the packed product, 6 or 8
rows, per thread). The rows of a recurrent batch are independent, so each thread runs the whole
loop over timesteps on its rows, with no wait between steps; after the backward loop the
threads wait once and each computes its columns of ``dW`` (and ``dW_ih``) and of the bias
gradients (at least 16 units each). Every product is ``netbuild_packed_gemm`` (not BLAS),
which adds each value's terms in one fixed order whatever the rows or columns it is computed
with: both ops give the same bits on any number of threads.

``activation`` and ``recurrent_activation`` are one of :data:`ACTIVATIONS` (the YAML names of
:mod:`netbuild.activations`, with the same derivatives, boundaries included: relu's is 1 at 0,
as PyTensor's ``maximum``; hard_sigmoid's is 1/6 on the closed interval, as ``clip``). They are
run-time parameters of the C code, so one compiled module serves every choice; the default pair
(tanh, sigmoid) and the simple RNN's tanh and relu have loops specialised at compile time. The
gate buffer keeps each gate's activated value, or its pre-activation for the piecewise-linear
relu and hard_sigmoid (whose derivative at a kink the value alone cannot tell).

The C is in ``recurrent.c``, after netbuild's shared glue (:mod:`netbuild.ops`).

Both ops also have a numpy ``perform``, which PyTensor's Python modes (the tests' FAST_COMPILE)
run; it follows the C code line by line.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor import config
from pytensor.gradient import DisconnectedType, disconnected_type
from pytensor.graph.basic import Apply
from pytensor.link.c.params_type import ParamsType
from pytensor.scalar import int32, upcast

from . import CCall, NetbuildCOp, projection

#: The activations the C code computes, by YAML name, and their codes in it.
ACTIVATIONS = {"linear": 0, "tanh": 1, "sigmoid": 2, "relu": 3, "hard_sigmoid": 4}
#: Activations whose gate buffer entry is the pre-activation, not the value.
_KEEPS_INPUT = {"relu", "hard_sigmoid"}
#: cell -> (gate blocks G, name of the extra input after h0 or None)
CELLS = {"simple_rnn": (1, None), "lstm": (4, "c0"), "gru": (3, "b_hn")}

# Shapes of the ops' inputs and outputs, as C initializer lists (Tn, Bn, U, G = gates * U and
# the inputs' features F).
_SHAPES = {"P": "Tn, Bn, G", "X": "Tn, Bn, F", "W_ih": "F, G", "b": "G", "W": "U, G",
           "h0": "Bn, U", "c0": "Bn, U", "b_hn": "U", "M": "Tn, Bn",
           "H": "Tn, Bn, U", "C": "Tn, Bn, U", "S": "Tn, Bn, G", "AC": "Tn, Bn, U",
           "HN": "Tn, Bn, U", "dH": "Tn, Bn, U", "dC": "Tn, Bn, U"}
for _n in ("P", "W_ih", "b", "W", "h0", "c0", "b_hn"):  # what the gradient op gives
    _SHAPES["d" + _n] = _SHAPES[_n]
#: The inputs that give T and B (and F): the forward op's sequence, the gradient op's H.
_SEQUENCES = ("P", "X", "H")


class _RecurrentCOp(NetbuildCOp):
    """What the forward and gradient ops share: properties, the C kernels.

    A subclass names its inputs and outputs (:meth:`input_names`, :meth:`output_names`) and
    gives the kernel call (:meth:`_kernel`)."""

    c_file = "recurrent.c"
    shared_files = (*NetbuildCOp.shared_files, "packed.c")  # its products (no BLAS)
    # without trapping maths g++ may compute both sides of a select: the loops vectorize
    extra_compile_args = ("-fno-trapping-math",)

    __props__ = ("cell", "activation", "recurrent_activation", "masked", "project")
    params_type = ParamsType(act=int32, ract=int32)

    def __init__(self, cell: str, activation: str = "tanh", recurrent_activation: str = "sigmoid",
                 masked: bool = False, project: bool = False):
        if cell not in CELLS:
            raise ValueError(f"unknown cell '{cell}'; expected one of {sorted(CELLS)}")
        for a in (activation, recurrent_activation):
            if a not in ACTIVATIONS:
                raise ValueError(f"no C code for activation '{a}'; expected one of "
                                 f"{sorted(ACTIVATIONS)}")
        self.cell = cell
        self.activation = activation
        self.recurrent_activation = recurrent_activation
        self.gates = CELLS[cell][0]
        self.masked = bool(masked)
        self.project = bool(project)

    def input_names(self) -> list[str]:
        raise NotImplementedError

    def output_names(self) -> list[str]:
        raise NotImplementedError

    def get_params(self, node):
        return self.params_type.get_params(act=ACTIVATIONS[self.activation],
                                           ract=ACTIVATIONS[self.recurrent_activation])

    def _tensors(self, values) -> list:
        """The inputs as tensors of one float type (their upcast, or floatX when that is no
        float), each checked for its number of axes."""
        names = self.input_names()
        if len(values) != len(names):
            raise TypeError(f"{self} takes {len(names)} inputs ({', '.join(names)}); "
                            f"received {len(values)}")
        tensors = [pt.as_tensor_variable(v) for v in values]
        dtype = upcast(*[t.dtype for t, n in zip(tensors, names) if n != "M"])
        if dtype not in ("float32", "float64"):
            dtype = config.floatX
        tensors = [pt.cast(t, dtype) for t in tensors]
        for t, name in zip(tensors, names):
            ndim = _SHAPES[name].count(",") + 1
            if t.type.ndim != ndim:
                raise TypeError(f"{self}: {name} must have {ndim} axes; received {t.type.ndim}")
        return tensors

    def _output_types(self, by_name: dict) -> list:
        """Output types with the static sizes the inputs tell (T, B from the first sequence
        input, U from W)."""
        seq = next(by_name[n] for n in _SEQUENCES if n in by_name)
        T, B = seq.type.shape[:2]
        U = by_name["W"].type.shape[0]
        G = None if U is None else self.gates * U
        F = by_name["X"].type.shape[2] if "X" in by_name else None
        sizes = {"Tn": T, "Bn": B, "U": U, "G": G, "F": F}
        dtype = by_name["W"].dtype
        return [pt.tensor(dtype=dtype, shape=tuple(sizes[d.strip()] for d in
                                                   _SHAPES[n].split(",")))
                for n in self.output_names()]

    def infer_shape(self, fgraph, node, shapes):
        by = dict(zip(self.input_names(), shapes))
        seq = next(by[n] for n in _SEQUENCES if n in by)
        sizes = {"Tn": seq[0], "Bn": seq[1], "U": by["W"][0], "G": by["W"][1]}
        if "X" in by:
            sizes["F"] = by["X"][2]
        return [tuple(sizes[d.strip()] for d in _SHAPES[n].split(","))
                for n in self.output_names()]

    # -- C compilation --------------------------------------------------------------------------
    def _kernel(self) -> tuple[str, str, str]:
        """``(call, scratch elements, scratch doubles)``: the kernel call with ``{name}`` for
        each input and output and ``{w}``, ``{acc}`` for the scratch buffers."""
        raise NotImplementedError

    def c_code(self, node, name, inputs, outputs, sub):
        """Check the inputs' shapes, make them contiguous, allocate the outputs and the scratch
        buffer, run the kernel without the GIL (:class:`netbuild.ops.CCall`)."""
        call = CCall(self, node, name, sub)
        in_names, out_names = self.input_names(), self.output_names()
        seq = inputs[in_names.index(next(n for n in _SEQUENCES if n in in_names))]
        W = inputs[in_names.index("W")]
        kernel, n_work, n_acc = self._kernel()
        call.line(f"int act_ = {sub['params']}->act, ract_ = {sub['params']}->ract;")
        call.line(f"npy_intp Tn = PyArray_NDIM({seq}) == 3 ? PyArray_DIMS({seq})[0] : 0;")
        call.line(f"npy_intp Bn = PyArray_NDIM({seq}) == 3 ? PyArray_DIMS({seq})[1] : 0;")
        call.line(f"npy_intp U = PyArray_NDIM({W}) == 2 ? PyArray_DIMS({W})[0] : 0;")
        call.line(f"npy_intp G = {self.gates} * U;")
        if "X" in in_names:
            call.line(f"npy_intp F = PyArray_NDIM({seq}) == 3 ? PyArray_DIMS({seq})[2] : 0;")
        for n, v in zip(in_names, inputs):
            call.check_shape(v, n, _SHAPES[n])
        args = {n: call.input(v) for n, v in zip(in_names, inputs)}
        args.update({n: call.output(o, _SHAPES[n]) for n, o in zip(out_names, outputs)})
        call.scratch(f"sizeof(double) * ({n_acc}) + sizeof(T_) * ({n_work})")
        args.update(acc="((double*)s_)", w=f"((T_*)(s_ + sizeof(double) * ({n_acc})))",
                    null="((T_*)0)")
        call.run(kernel.format(**args))
        return call.code()


def _check_shapes(op: _RecurrentCOp, values: list) -> None:
    """The numpy twin of the C code's shape checks (``netbuild_check_shape``)."""
    by = dict(zip(op.input_names(), values))
    seq = next(by[n] for n in _SEQUENCES if n in by)
    T, B = seq.shape[:2] if seq.ndim == 3 else (0, 0)
    U = by["W"].shape[0] if by["W"].ndim == 2 else 0
    F = seq.shape[2] if seq.ndim == 3 else 0
    sizes = {"Tn": T, "Bn": B, "U": U, "G": op.gates * U, "F": F}
    for name, value in by.items():
        expected = _SHAPES[name]
        want = tuple(sizes[d.strip()] for d in expected.split(","))
        if value.shape != want:
            raise ValueError(f"{type(op).__name__}: {name} has shape {value.shape}; expected "
                             f"({expected}) = {want}")


def _zeros_if_disconnected(g, like):
    return pt.zeros_like(like) if isinstance(g.type, DisconnectedType) else g


class RecurrentSequence(_RecurrentCOp):
    """A whole sequence of recurrent steps; see the module docstring.

    Inputs ``P, b, W, h0`` and ``c0`` (lstm) or ``b_hn`` (gru), then ``M`` when ``masked``; with
    ``project``, ``X, W_ih`` in place of ``P``. Outputs ``simple_rnn: H, S``, ``lstm: H, C, S,
    AC``, ``gru: H, S, HN``.
    """

    def input_names(self):
        extra = CELLS[self.cell][1]
        return ((["X", "W_ih"] if self.project else ["P"]) + ["b", "W", "h0"]
                + ([extra] if extra else []) + ["M"] * self.masked)

    def output_names(self):
        return {"simple_rnn": ["H", "S"], "lstm": ["H", "C", "S", "AC"],
                "gru": ["H", "S", "HN"]}[self.cell]

    def make_node(self, *values):
        tensors = self._tensors(values)
        return Apply(self, tensors, self._output_types(dict(zip(self.input_names(), tensors))))

    def connection_pattern(self, node):
        n_out = len(node.outputs)
        return [[name != "M"] * n_out for name in self.input_names()]

    def pullback(self, inputs, outputs, cotangents):
        n_states = 2 if self.cell == "lstm" else 1
        for g in cotangents[n_states:]:
            if not isinstance(g.type, DisconnectedType):
                raise NotImplementedError(f"{self}: no gradient through its gate outputs")
        by = dict(zip(self.input_names(), inputs))
        by.update(zip(self.output_names(), outputs))
        by["dH"] = _zeros_if_disconnected(cotangents[0], outputs[0])
        with_dC = self.cell == "lstm" and not isinstance(cotangents[1].type, DisconnectedType)
        if with_dC:
            by["dC"] = cotangents[1]
        grad = RecurrentSequenceGrad(self.cell, self.activation, self.recurrent_activation,
                                     with_dC, self.masked, self.project)
        grads = grad(*[by[n] for n in grad.input_names()], return_list=True)
        if self.project:  # P = X W_ih: dX = dP W_ih^T (Projection), dW_ih from the gradient op
            X, W_ih, dP, dW_ih = by["X"], by["W_ih"], grads[0], grads.pop()
            rows = dP.reshape((X.shape[0] * X.shape[1], W_ih.shape[1]))
            dX = projection.project(rows, W_ih.T).reshape(X.shape)
            grads = [dX, dW_ih] + grads[1:]
        return grads + [disconnected_type()] * self.masked  # none for the mask

    def perform(self, node, inputs, output_storage):
        dtype = node.outputs[0].dtype
        values = [np.asarray(i, dtype=dtype) for i in inputs]
        _check_shapes(self, values)
        by = dict(zip(self.input_names(), values))
        if self.project:
            by["P"] = np.matmul(by.pop("X"), by.pop("W_ih"))  # (T, B, F) (F, G): (T, B, G)
        outs = _np_forward(self.cell, self.activation, self.recurrent_activation, by)
        for storage, value in zip(output_storage, outs):
            storage[0] = np.asarray(value, dtype=dtype)

    def _kernel(self):
        M = "{M}" if self.masked else "{null}"
        F = "F" if self.project else "0"
        work = f"nbrec::forward_work<T_>({self.gates}, Bn, U, {str(self.project).lower()}, {F})"
        ins = ("nbrec::inputs<T_>{{{null}, {X}, {W_ih}, F}}" if self.project
               else "nbrec::inputs<T_>{{{P}, {null}, {null}, 0}}")
        if self.cell == "simple_rnn":
            return ("nbrec::rnn_forward(act_, Tn, Bn, U, " + ins + ", {b}, {W}, {h0}, " + M
                    + ", {H}, {S}, {w})", work, "0")
        if self.cell == "lstm":
            return ("nbrec::lstm_forward(act_, ract_, Tn, Bn, U, " + ins + ", {b}, {W}, {h0}, "
                    "{c0}, " + M + ", {H}, {C}, {S}, {AC}, {w})", work, "0")
        return ("nbrec::gru_forward(act_, ract_, Tn, Bn, U, " + ins + ", {b}, {W}, {h0}, "
                "{b_hn}, " + M + ", {H}, {S}, {HN}, {w})", work, "0")


class RecurrentSequenceGrad(_RecurrentCOp):
    """Backpropagation through a :class:`RecurrentSequence`.

    Inputs: ``W, h0`` (and ``c0``), the forward op's outputs, then the gradient ``dH`` of ``H``
    (and ``dC`` of ``C`` when ``with_dC``), then the inputs ``X`` with ``project``, then the mask
    ``M`` when ``masked``. Outputs the gradients of the forward op's inputs but the mask (and
    ``X``): ``dP, db, dW, dh0`` and ``dc0`` (lstm) or ``db_hn`` (gru), then ``dW_ih`` with
    ``project`` (``sum_t x[t]^T dP[t]``, its rows in ``dW``'s order: steps 1..T-1, then step 0;
    for the simple RNN and the LSTM, whose ``dW`` is also from ``dP``, from the same packed
    blocks).
    """

    __props__ = (*_RecurrentCOp.__props__, "with_dC")

    def __init__(self, cell: str, activation: str = "tanh", recurrent_activation: str = "sigmoid",
                 with_dC: bool = False, masked: bool = False, project: bool = False):
        super().__init__(cell, activation, recurrent_activation, masked, project)
        self.with_dC = bool(with_dC) and cell == "lstm"

    def input_names(self):
        names = {"simple_rnn": ["W", "h0", "H", "S", "dH"],
                 "lstm": ["W", "h0", "c0", "H", "C", "S", "AC", "dH"] + ["dC"] * self.with_dC,
                 "gru": ["W", "h0", "H", "S", "HN", "dH"]}[self.cell]
        return names + ["X"] * self.project + ["M"] * self.masked

    def output_names(self):
        extra = CELLS[self.cell][1]
        return ["dP", "db", "dW", "dh0"] + (["d" + extra] if extra else []) + \
            ["dW_ih"] * self.project

    def make_node(self, *values):
        tensors = self._tensors(values)
        return Apply(self, tensors, self._output_types(dict(zip(self.input_names(), tensors))))

    def perform(self, node, inputs, output_storage):
        dtype = node.outputs[0].dtype
        values = [np.asarray(i, dtype=dtype) for i in inputs]
        _check_shapes(self, values)
        by = dict(zip(self.input_names(), values))
        outs = _np_backward(self.cell, self.activation, self.recurrent_activation, by)
        if self.project:  # dW_ih = sum_t x[t]^T dP[t]
            outs.append(np.einsum("tbf,tbg->fg", by["X"], outs[0]))
        for storage, value in zip(output_storage, outs):
            storage[0] = np.asarray(value, dtype=dtype)

    def _kernel(self):
        # scratch: dh (and dc) carried from step to step, the GRU's dQ, and with a mask the
        # copies of dh (and dc) a padded step carries unchanged (sdh, sdc), then W packed
        M = "{M}" if self.masked else "{null}"
        n = {"simple_rnn": "Bn * U", "lstm": "2 * Bn * U", "gru": "Bn * U + Tn * Bn * G"}[self.cell]
        sdh = "{w} + " + n if self.masked else "{null}"
        sdc = "{w} + " + n + " + Bn * U" if self.masked else "{null}"
        cells = n + (" + 2 * Bn * U" if self.masked else "")
        pack = f"{{w}} + {cells}"
        work = f"{cells} + nbrec::backward_work<T_>({self.gates}, U)"
        ins = ("nbrec::input_grad<T_>{{{X}, F, {dW_ih}}}" if self.project
               else "nbrec::input_grad<T_>{{{null}, 0, {null}}}")
        if self.cell == "simple_rnn":
            return ("nbrec::rnn_backward(act_, Tn, Bn, U, {W}, {h0}, {H}, {S}, {dH}, " + M +
                    ", {dP}, {db}, {dW}, {dh0}, {w}, " + sdh + ", " + pack + ", {acc}, " + ins
                    + ")", work, "U")
        if self.cell == "lstm":
            dC = "{dC}" if self.with_dC else "{null}"
            return ("nbrec::lstm_backward(act_, ract_, Tn, Bn, U, {W}, {h0}, {c0}, {H}, {C}, "
                    "{S}, {AC}, {dH}, " + dC + ", " + M + ", {dP}, {db}, {dW}, {dh0}, {dc0}, "
                    "{w}, {w} + Bn * U, " + sdh + ", " + sdc + ", " + pack + ", {acc}, " + ins
                    + ")", work, "G")
        return ("nbrec::gru_backward(act_, ract_, Tn, Bn, U, {W}, {h0}, {H}, {S}, {HN}, {dH}, "
                + M + ", {dP}, {db}, {dW}, {dh0}, {db_hn}, {w}, {w} + Bn * U, " + sdh + ", " +
                pack + ", {acc}, " + ins + ")", work, "G + U")


def sequence(cell: str, seq, b, W, h0, extra=None, activation: str = "tanh",
             recurrent_activation: str = "sigmoid", mask=None, W_ih=None) -> list:
    """All of the forward op's outputs for a sequence; ``[0]`` is ``H (T, B, U)``. ``seq`` is
    every step's input projection ``P (T, B, G*U)``, or with ``W_ih`` the inputs ``X (T, B, F)``
    that the op projects itself (``X W_ih``, a step at a time). ``mask (T, B)``, when given, is 0
    at a padded step (which leaves the states as they were)."""
    op = RecurrentSequence(cell, activation, recurrent_activation, mask is not None,
                           project=W_ih is not None)
    return op(seq, *([] if W_ih is None else [W_ih]), b, W, h0, *([] if extra is None else [extra]),
              *([] if mask is None else [mask]), return_list=True)


# -- numpy: the same algorithm, for PyTensor's Python modes ----------------------------------------
def _np_act(name: str, x: np.ndarray) -> np.ndarray:
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-x))
    if name == "relu":
        return np.where(0 > x, 0, x).astype(x.dtype)
    if name == "hard_sigmoid":
        return np.clip(x / x.dtype.type(6) + x.dtype.type(0.5), 0, 1)
    return x.copy()


def _np_keep(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """What the gate buffer keeps: the pre-activation for relu and hard_sigmoid."""
    return x if name in _KEEPS_INPUT else y


def _np_value(name: str, s: np.ndarray) -> np.ndarray:
    return _np_act(name, s) if name in _KEEPS_INPUT else s


def _np_act_grad(name: str, s: np.ndarray, g: np.ndarray) -> np.ndarray:
    if name == "tanh":
        return g * (1 - s * s)
    if name == "sigmoid":
        return g * s * (1 - s)
    if name == "relu":
        return (s >= 0) * g
    if name == "hard_sigmoid":
        v = s / s.dtype.type(6) + s.dtype.type(0.5)
        return ((v >= 0) & (v <= 1)) * g / s.dtype.type(6)
    return g


def _held(M, t, new, old):
    """A state after step t: the new one, or the old one in the rows padded at t (no mask: new)."""
    return new if M is None else np.where(M[t][:, None] != 0, new, old)


def _np_forward(cell, act, ract, by: dict):
    P, b, W, h0, M = by["P"], by["b"], by["W"], by["h0"], by.get("M")
    T, B, G = P.shape
    U = W.shape[0]
    H = np.empty((T, B, U), P.dtype)
    S = np.empty_like(P)
    h = h0
    if cell == "simple_rnn":
        for t in range(T):
            a = (P[t] + b) + h @ W
            new = _np_act(act, a)
            S[t] = _np_keep(act, a, new)
            H[t] = h = _held(M, t, new, h)
        return H, S
    if cell == "lstm":
        C, AC = np.empty_like(H), np.empty_like(H)
        c = by["c0"]
        for t in range(T):
            a = (P[t] + b) + h @ W
            y = np.concatenate([_np_act(ract, a[:, :2 * U]), _np_act(act, a[:, 2 * U:3 * U]),
                                _np_act(ract, a[:, 3 * U:])], axis=1)
            i, f, g, o = np.split(y, 4, axis=1)
            new_c = f * c + i * g
            AC[t] = _np_act(act, new_c)
            H[t] = h = _held(M, t, o * AC[t], h)
            C[t] = c = _held(M, t, new_c, c)
            S[t] = np.concatenate([_np_keep(ract, a[:, :2 * U], y[:, :2 * U]),
                                   _np_keep(act, a[:, 2 * U:3 * U], g),
                                   _np_keep(ract, a[:, 3 * U:], o)], axis=1)
        return H, C, S, AC
    HN = np.empty_like(H)
    for t in range(T):
        p = P[t] + b
        q = h @ W
        pre_rz = p[:, :2 * U] + q[:, :2 * U]
        rz = _np_act(ract, pre_rz)
        r, z = rz[:, :U], rz[:, U:]
        HN[t] = q[:, 2 * U:] + by["b_hn"]
        pre_n = p[:, 2 * U:] + r * HN[t]
        n = _np_act(act, pre_n)
        H[t] = h = _held(M, t, (1 - z) * n + z * h, h)
        S[t] = np.concatenate([_np_keep(ract, pre_rz, rz), _np_keep(act, pre_n, n)], axis=1)
    return H, S, HN


def _np_backward(cell, act, ract, by: dict) -> list:
    """With a mask: a row padded at step t gets no gate gradient and carries dh (and dc, plus
    dC[t]) to step t - 1 unchanged."""
    W, h0, H, S, dH, M = by["W"], by["h0"], by["H"], by["S"], by["dH"], by.get("M")
    pad = (lambda t: M[t] == 0) if M is not None else (lambda t: slice(0, 0))  # padded rows
    U = W.shape[0]
    T = H.shape[0]
    Hprev = np.concatenate([h0[None], H[:-1]]) if T else H
    dP = np.empty_like(S)
    dh = dH[T - 1].copy() if T else np.zeros_like(h0)
    if cell == "simple_rnn":
        for t in reversed(range(T)):
            dP[t] = _np_act_grad(act, S[t], dh)
            dP[t][pad(t)] = 0
            carried = 0 if M is None else np.where(M[t][:, None] == 0, dh, 0)
            dh = dP[t] @ W.T + (dH[t - 1] if t else 0) + carried
        return [dP, dP.sum(axis=(0, 1)), np.einsum("tbu,tbg->ug", Hprev, dP), dh]
    if cell == "lstm":
        C, AC, c0 = by["C"], by["AC"], by["c0"]
        dC = by.get("dC", np.zeros_like(C))
        Cprev = np.concatenate([c0[None], C[:-1]]) if T else C
        dc = np.zeros_like(c0)
        for t in reversed(range(T)):
            s = S[t]
            i, f = _np_value(ract, s[:, :U]), _np_value(ract, s[:, U:2 * U])
            g, o = _np_value(act, s[:, 2 * U:3 * U]), _np_value(ract, s[:, 3 * U:])
            d_ac = _np_act_grad(act, C[t] if act in _KEEPS_INPUT else AC[t], dh * o) + dC[t]
            dck = dc + d_ac
            d = np.concatenate([dck * g, dck * Cprev[t], dck * i, dh * AC[t]], axis=1)
            dP[t] = np.concatenate([_np_act_grad(ract, s[:, :2 * U], d[:, :2 * U]),
                                    _np_act_grad(act, s[:, 2 * U:3 * U], d[:, 2 * U:3 * U]),
                                    _np_act_grad(ract, s[:, 3 * U:], d[:, 3 * U:])], axis=1)
            dP[t][pad(t)] = 0
            carried = 0
            if M is None:
                dc = dck * f
            else:
                dc = np.where(M[t][:, None] == 0, dc + dC[t], dck * f)
                carried = np.where(M[t][:, None] == 0, dh, 0)
            dh = dP[t] @ W.T + (dH[t - 1] if t else 0) + carried
        return [dP, dP.sum(axis=(0, 1)), np.einsum("tbu,tbg->ug", Hprev, dP), dh, dc]
    HN = by["HN"]
    dQ = np.empty_like(S)
    for t in reversed(range(T)):
        s = S[t]
        r, z = _np_value(ract, s[:, :U]), _np_value(ract, s[:, U:2 * U])
        n = _np_value(act, s[:, 2 * U:])
        dpre_n = _np_act_grad(act, s[:, 2 * U:], dh * (1 - z))
        dz = dh * (Hprev[t] - n)
        dr = dpre_n * HN[t]
        dP[t] = np.concatenate([_np_act_grad(ract, s[:, :2 * U], np.concatenate([dr, dz], 1)),
                                dpre_n], axis=1)
        dQ[t] = np.concatenate([dP[t, :, :2 * U], dpre_n * r], axis=1)
        dP[t][pad(t)] = 0
        dQ[t][pad(t)] = 0
        kept = dh * z if M is None else np.where(M[t][:, None] == 0, dh, dh * z)
        dh = kept + dQ[t] @ W.T + (dH[t - 1] if t else 0)
    return [dP, dP.sum(axis=(0, 1)), np.einsum("tbu,tbg->ug", Hprev, dQ), dh,
            dQ[:, :, 2 * U:].sum(axis=(0, 1))]
