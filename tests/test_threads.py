"""Threads: how many (affinity, cgroup quota, NETBUILD_THREADS, --threads), and that netbuild's
parallel C ops and whole trainings give the same bits on 1 and 2 threads (the batch is cut into
slices that depend on its size alone)."""

from __future__ import annotations

import os

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import CONFIGS
from test_conv_ops import function
from test_projection_ops import _function as projection_function

from netbuild import threads
from netbuild.ops import recurrent
from netbuild.ops.conv import Conv
from netbuild.ops.pool import Pool


# -- how many ------------------------------------------------------------------------------------
@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "150000 100000\n"}, 2),            # v2: 1.5 cores rounds up
    ({"cpu.max": "max 100000\n"}, None),             # v2: no quota
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage"}, None),
    ({}, None),
])
def test_cgroup_quota_at_the_mount_points(files, limit, tmp_path):
    """Without /proc/self/cgroup: the quota of the mount points themselves."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    unreadable = tmp_path / "no-such-proc-file"
    assert threads._cgroup_limit(tmp_path, unreadable) == limit
    affinity = len(os.sched_getaffinity(0))
    assert threads.available_cores(tmp_path, unreadable) == min(affinity, limit or affinity)


@pytest.mark.parametrize("membership, files, limit", [
    # v2: the process's own cgroup and its ancestors; the tightest wins
    ("0::/slice/job\n", {"slice/cpu.max": "400000 100000", "slice/job/cpu.max": "200000 100000"}, 2),
    ("0::/slice/job\n", {"slice/cpu.max": "100000 100000", "slice/job/cpu.max": "max 100000"}, 1),
    # the hybrid layout: v1 controllers, v2 under unified/
    ("1:cpu,cpuacct:/docker/abc\n0::/\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000",
                                            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, 3),
    ("4:memory:/x\n1:cpu:/\n0::/\n", {"unified/cpu.max": "max 100000"}, None),
    ("garbage without colons\n", {}, None),
])
def test_cgroup_quota_of_this_process(membership, files, limit, tmp_path):
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "cgroup-membership"
    proc.write_text(membership)
    assert threads._cgroup_limit(root, proc) == limit


def test_the_default_is_every_core_or_netbuild_threads(monkeypatch):
    cores = threads.available_cores()
    monkeypatch.delenv("NETBUILD_THREADS", raising=False)
    assert threads.default_threads() == cores
    monkeypatch.setenv("NETBUILD_THREADS", "1")
    assert threads.default_threads() == 1 and threads.resolve(None) == 1
    assert threads.resolve(2) == min(2, cores)  # --threads wins over the variable
    monkeypatch.setenv("NETBUILD_THREADS", str(cores + 5))
    assert threads.default_threads() == cores  # never more than the cores
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("NETBUILD_THREADS", bad)
        with pytest.raises(threads.ThreadsError, match=r"expected a whole number of threads, at least 1"):
            threads.default_threads()


def test_a_bad_netbuild_threads_is_one_line(monkeypatch, run_cli, tmp_path):
    monkeypatch.setenv("NETBUILD_THREADS", "lots")
    result = run_cli("train", CONFIGS / "digits-mlp.yaml", "--run-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "NETBUILD_THREADS='lots': expected a whole number of threads, at least 1"]
    assert not (tmp_path / "run").exists()


def test_apply_tells_openmp_and_openblas(restore_threads):
    """The count reaches the libraries themselves, not only the environment."""
    for n in (2, 1):
        threads.apply(n)
        assert threads.describe()["blas_threads"] == n  # the bundled scipy-openblas32
        assert threads._load_gomp().omp_get_max_threads() == n
        assert os.environ["OMP_NUM_THREADS"] == os.environ["OPENBLAS_NUM_THREADS"] == str(n)


# -- the same bits on 1 and 2 threads ------------------------------------------------------------
def _on(n: int, fn, *args):
    threads.apply(n)
    return fn(*args)


@pytest.mark.parametrize("batch", [1, 7, 40])  # fewer images than slices, a remainder, many slices
def test_conv_and_pool_ops_give_the_same_bits_on_1_and_2_threads(batch, restore_threads):
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, 3, 9, 9)).astype("float32")
    w = rng.normal(size=(4, 3, 3, 3)).astype("float32")
    b = rng.normal(size=4).astype("float32")
    xv, wv, bv = pt.tensor4("x"), pt.tensor4("w"), pt.vector("b")
    y = Conv((1, 1), (1, 1), ((1, 1), (1, 1)), "relu")(xv, wv, bv)
    pooled = Pool("max", (2, 2), (2, 2), ((0, 0), (0, 0)))(y)
    loss = (pooled * pooled).sum() + (Pool("avg", (3, 3), (2, 2), ((1, 1), (1, 1)))(y) ** 2).sum()
    outputs = [y, pooled, *pytensor.grad(loss, [xv, wv, bv])]
    fn = function([xv, wv, bv], outputs, c=True)
    one = _on(1, fn, x, w, b)
    two = _on(2, fn, x, w, b)
    for name, a, c in zip(["y", "pooled", "dx", "dW", "db"], one, two):
        np.testing.assert_array_equal(a, c, err_msg=name)
    numpy = function([xv, wv, bv], outputs, c=False)(x, w, b)
    for name, a, ref in zip(["y", "pooled", "dx", "dW", "db"], two, numpy):
        np.testing.assert_allclose(a, ref, rtol=2e-4, atol=2e-4, err_msg=name)


def _sequence_function(cell: str, activation: str, recurrent_activation: str, dtype: str,
                       masked: bool = False):
    """The recurrent op's outputs and every input's gradient, in C: the op as the layers use it,
    projecting its inputs ``X`` by ``W_ih`` a step at a time."""
    names = ["X", "W_ih", "b", "W", "h0"] + [e for e in [recurrent.CELLS[cell][1]] if e]
    ndims = {"X": 3, "W_ih": 2, "b": 1, "W": 2, "h0": 2, "c0": 2, "b_hn": 1}
    inputs = [pt.tensor(n, dtype=dtype, shape=(None,) * ndims[n]) for n in names]
    mask = pt.tensor("mask", dtype=dtype, shape=(None, None)) if masked else None
    X, W_ih, *rest = inputs
    outs = recurrent.sequence(cell, X, *rest[:3], *(rest[3:] or [None]), activation=activation,
                              recurrent_activation=recurrent_activation, mask=mask, W_ih=W_ih)
    weights = pt.tensor("weights", dtype=dtype, shape=(None, None, None))
    loss = (outs[0] * weights).sum()
    if cell == "lstm":  # a gradient reaches the cell states too
        loss = loss + (outs[1] * outs[1]).sum()
    extra = [mask] if masked else []
    return names, function([*inputs, *extra, weights], [*outs, *pytensor.grad(loss, inputs)],
                           c=True)


# Rows (each thread runs the loop on its rows, at least recurrent.c's ROWS_PER_PART, a tile of
# 6 or 8): one part on any number of threads (1, 5 or 9 rows), two even parts (16), two uneven
# ones (17); units (each thread's columns of the weight gradients, at least UNITS_PER_PART = 16):
# one part (20), two even (40), two uneven (37); and more rows (6 steps x 50) than one block of
# the weight gradient's (256). Masked: rows padded at some steps, on split rows.
@pytest.mark.parametrize("units, batch, masked", [
    (20, 5, False), (40, 1, False), (40, 9, False), (40, 16, False), (37, 17, False),
    (37, 50, False), (37, 17, True)])
@pytest.mark.parametrize("cell, activation, recurrent_activation", [
    ("simple_rnn", "tanh", "sigmoid"), ("simple_rnn", "relu", "sigmoid"),
    ("lstm", "tanh", "sigmoid"), ("lstm", "relu", "hard_sigmoid"),
    ("gru", "tanh", "sigmoid"), ("gru", "linear", "hard_sigmoid")])
def test_recurrent_ops_on_1_and_2_threads(cell, activation, recurrent_activation, units, batch,
                                          masked, restore_threads):
    """Each thread runs the loop on its own rows (their input projection and the product with
    W_hh at every step), then computes its own units' columns of the weight gradients, with
    products that add each value's terms in one order whatever the rows or columns computed with
    it (ops/packed.c): 1 and 2 threads give the same bits, in float64 and float32, for the
    outputs and the gradients of every input (X's by the Projection op)."""
    rng = np.random.default_rng(units * batch)
    T, U = 6, units
    G = recurrent.CELLS[cell][0] * U
    values = {"X": rng.normal(size=(T, batch, 5)), "W_ih": rng.normal(size=(5, G)) * 0.5,
              "b": rng.normal(size=G) * 0.1,
              "W": rng.normal(size=(U, G)) * 0.3, "h0": rng.normal(size=(batch, U)) * 0.5,
              "c0": rng.normal(size=(batch, U)) * 0.5, "b_hn": rng.normal(size=U) * 0.1}
    mask = (rng.random((T, batch)) < 0.7).astype("float64")
    mask[:, 0] = 1.0  # a row with every step real
    for dtype in ("float64", "float32"):
        names, fn = _sequence_function(cell, activation, recurrent_activation, dtype, masked)
        args = ([values[n].astype(dtype) for n in names] + ([mask.astype(dtype)] if masked else [])
                + [rng.normal(size=(T, batch, U)).astype(dtype)])
        one = [a.copy() for a in _on(1, fn, *args)]
        two = _on(2, fn, *args)
        for i, (a, b) in enumerate(zip(one, two)):
            np.testing.assert_array_equal(a, b, err_msg=f"{dtype} output {i}")
        assert all(np.isfinite(a).all() for a in two)


@pytest.mark.parametrize("rows, columns", [(63, 40), (200, 31), (3200, 512)])
def test_projection_ops_give_the_same_bits_on_1_and_2_threads(rows, columns, restore_threads):
    """The input projection splits its rows (at least 64 per thread) and its weight gradient the
    columns (at least 32): one part, uneven parts, the bench LSTM's shape."""
    rng = np.random.default_rng(rows)
    for dtype in ("float64", "float32"):
        fn = projection_function(dtype, c=True)
        args = [rng.normal(size=s).astype(dtype) for s in [(rows, 32), (32, columns),
                                                            (rows, columns)]]
        one = [a.copy() for a in _on(1, fn, *args)]
        for a, b in zip(one, _on(2, fn, *args)):
            np.testing.assert_array_equal(a, b)


def test_adam_step_gives_the_same_bits_on_1_and_2_threads(restore_threads):
    """Adam's update splits a large parameter over the threads (parts of at least 64k elements):
    elementwise, so the same bits on any number of threads, and the numpy equations."""
    from netbuild.ops.update import AdamStep

    rng = np.random.default_rng(3)
    n = 200_003  # on 2 threads, two uneven parts (100,001 and 100,002 elements)
    p, m, g = (rng.standard_normal(n).astype("float32") for _ in range(3))
    v = rng.random(n).astype("float32")
    pv, mv, vv, gv = (pt.vector(k, dtype="float32") for k in "pmvg")
    outs = AdamStep(0.9, 0.999, 1e-8)(pv, mv, vv, gv, np.float32(1e-3), np.float32(1.2),
                                      np.float32(0.0))
    fn = function([pv, mv, vv, gv], outs, c=True)
    one = [a.copy() for a in _on(1, fn, p, m, v, g)]
    two = [a.copy() for a in _on(2, fn, p, m, v, g)]
    for name, a, b in zip("pmv", one, two):
        np.testing.assert_array_equal(a, b, err_msg=name)
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.999 * v + 0.001 * g * g
    p2 = p - 1e-3 * m2 / (np.sqrt(v2) * 1.2 + 1e-8)
    for name, a, ref in zip("pmv", two, (p2, m2, v2)):
        np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_descent_step_gives_the_same_bits_on_1_and_2_threads(restore_threads):
    """SGD-momentum's ``p -= lr * v`` splits a large parameter over the threads (parts of at least
    128k elements): the same bits on any number of threads, and numpy's values (to the rounding:
    g++ may fuse the multiply and the subtraction)."""
    from netbuild.ops.update import DescentStep

    rng = np.random.default_rng(4)
    n = 400_003  # on 2 threads, two uneven parts
    p, d = (rng.standard_normal(n).astype("float32") for _ in range(2))
    pv, dv = pt.vector("p", dtype="float32"), pt.vector("d", dtype="float32")
    fn = function([pv, dv], DescentStep()(pv, dv, np.float32(0.03)), c=True)
    one = _on(1, fn, p, d).copy()
    np.testing.assert_array_equal(one, _on(2, fn, p, d))
    np.testing.assert_allclose(one, p - np.float64(np.float32(0.03)) * d, rtol=1e-6, atol=1e-7)


def _trained(run_cli, config, run, n: int, epochs: int) -> dict:
    result = run_cli("train", CONFIGS / config, "--run-dir", run, "--epochs", epochs, "--threads", n,
                     "--quiet")
    assert result.exit_code == 0, result.stderr
    with np.load(run / "model.npz") as f:
        return {k: f[k] for k in f.files if not k.startswith("__")}


# (config, epochs, bitwise). Every config trains the same bits: the LSTM's recurrent ops and its
# input projections are netbuild's (ops/recurrent.py, ops/projection.py); the dense layers'
# products are OpenBLAS's, the same bits on 1 and 2 threads at these shapes.
@pytest.mark.parametrize("config, epochs, bitwise", [
    ("digits-mlp.yaml", 3, True),
    ("digits-cnn.yaml", 1, True),
    pytest.param("digits-lstm.yaml", 1, True, marks=pytest.mark.slow),
    pytest.param("digits-resnet.yaml", 1, True, marks=pytest.mark.slow),
])
def test_training_on_1_and_2_threads(config, epochs, bitwise, run_cli, tmp_path, restore_threads):
    """The README's claim: the same spec and seed give the same model bit for bit whatever the
    threads for the MLP, CNN, LSTM and ResNet configs."""
    one = _trained(run_cli, config, tmp_path / "one", 1, epochs)
    two = _trained(run_cli, config, tmp_path / "two", 2, epochs)
    assert one.keys() == two.keys()
    for key in one:
        if bitwise:
            np.testing.assert_array_equal(one[key], two[key], err_msg=key)
        else:
            np.testing.assert_allclose(one[key], two[key], rtol=0, atol=1e-5, err_msg=key)


def test_openmp_threads_spin_a_while_unless_the_user_sets_a_policy(monkeypatch):
    """netbuild's default: GOMP_SPINCOUNT (its pool spins between a step's loops); a user's
    OMP_WAIT_POLICY, or their own spin count, is left to libgomp."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    threads.wait_policy()
    assert os.environ["GOMP_SPINCOUNT"] == threads.WAIT_POLICY["GOMP_SPINCOUNT"]
    assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "17"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    threads.wait_policy()
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    threads.wait_policy()
    assert os.environ["GOMP_SPINCOUNT"] == "7"
