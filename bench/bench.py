"""``make bench``: netbuild against PyTorch on the CPU, side by side, written to bench/RESULTS.md.

Each tool trains in a process of its own (a *worker*), as a user runs it, on the models of
:mod:`models` (MLP, CNN, LSTM, masked LSTM, GRU, transformer block) with each optimizer of :data:`models.OPTIMIZERS` (SGD with
momentum, Adam), in two settings:

- **defaults**: each tool at its own default thread count, the environment's thread variables
  (``NETBUILD_THREADS``, ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``)
  removed: netbuild uses every core the process may run on, PyTorch ``torch.get_num_threads()``;
- **1 thread**: netbuild with ``NETBUILD_THREADS=1`` (what ``--threads 1`` sets), PyTorch after
  ``torch.set_num_threads(1)``.

netbuild trains through the loop of ``netbuild train`` (``Trainer.run_epoch``); PyTorch (eager,
CPU) trains the same network from the same initial weights (netbuild's, written to a file the
PyTorch worker reads) on the same batches in the same order. For each setting in turn, both
workers start (one warm-up epoch each), then epochs alternate, netbuild and PyTorch (each going
first in every other round), for ``--rounds`` rounds. Each figure is a median over rounds, each ratio the median of the rounds'
paired ratios (this machine's speed drifts within a minute), and each tool's speed-up from 1
thread to all cores its median at the defaults over its median on one thread. netbuild's
speed-up is also measured paired, in one process (:func:`paired_gain`, ``bench/threads.py``):
epochs on 1 thread and on every core alternating, seconds apart, where the workers' medians
come from processes minutes apart.

Also measured: the matrix-product bound of the MLP (an epoch of nothing but each training step's
matrix products on the step's batches: numpy's on one thread, in the step's order, with, for
reference, the sum of the products each timed alone with its operands in cache; netbuild's own
product op on every core at the defaults, in PyTensor's order), the compile time
of each training function with an empty compile cache (a fresh PyTensor compiledir, in a new
process) and with a warm one, and the peak memory (max RSS) of ``netbuild train`` on a 1 GiB
float32 npz.

The environment's other variables are kept. Where the machine forces OpenBLAS's kernels
(``OPENBLAS_CORETYPE``), the report says so: run ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE
make bench`` to measure with the kernels OpenBLAS picks for the CPU, as on a user's machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if "--worker" in sys.argv and sys.argv[sys.argv.index("--worker") + 1:][:1] in (["netbuild"],
                                                                                ["bound"]):
    import netbuild  # noqa: F401  first, as `netbuild train` does (before numpy: netbuild.threads)
#: The environment as the bench was started, before importing netbuild sets thread variables of
#: its own in this process: what the workers start from.
BASE_ENV = dict(os.environ)

#: The thread variables a user's defaults are without.
THREAD_VARS = ("NETBUILD_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: Settings: name -> thread count (None: each tool's default).
SETTINGS = {"defaults": None, "1 thread": 1}

#: Targets (netbuild / PyTorch samples/s, both optimizers), by setting and model.
TARGETS = {"defaults": {"mlp": 1.5, "cnn": 1.3, "lstm": 1.2, "masked-lstm": 1.0, "gru": 1.2,
                        "transformer": 1.0},
           "1 thread": {"mlp": 1.0, "cnn": 1.2, "lstm": 1.0, "masked-lstm": 1.0, "gru": 1.0,
                        "transformer": 1.0}}
#: netbuild's gain from the second core, by model.
SPEEDUP_TARGETS = {"cnn": 1.7, "lstm": 1.7}
BOUND_TARGET = 0.8
COMPILE_COLD_TARGET, COMPILE_WARM_TARGET = 20.0, 2.0
MEMORY_TARGET_GB = 2.5


# -- workers: one process per tool, driven over stdin/stdout --------------------------------------
def _serve(answer) -> None:
    """Answer ``epoch K`` lines with ``answer(K)`` (a dict, as one JSON line) until ``quit``."""
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            return
        print(json.dumps(answer(int(words[1]))), flush=True)


def netbuild_trainer(model, workdir: Path, optimizer: str = "adam"):
    """A Trainer for ``model`` on synthetic data in ``workdir`` (compiled: the cache may be warm)."""
    import numpy as np

    from netbuild.runs import RunDir
    from netbuild.spec import load_spec
    from netbuild.training import Trainer

    x, y = model.data()
    np.savez(workdir / f"{model.name}.npz", x=x, y=y)
    spec_file = workdir / f"{model.name}-{optimizer}.yaml"
    spec_file.write_text(model.spec_text(f"{model.name}.npz", epochs=1000, optimizer=optimizer))
    run = RunDir(workdir / f"run-{model.name}-{optimizer}")
    run.create()
    return Trainer.prepare(load_spec(str(spec_file)), run)


def _netbuild_worker(model, optimizer: str, workdir: Path, params: Path, epochs: int) -> None:
    """Writes the initial weights to ``params`` and the shuffled order of each epoch to
    ``orders_file(params)`` for the PyTorch worker, which does not import netbuild (importing it
    sets thread variables)."""
    import numpy as np

    from netbuild import threads
    from netbuild.data import epoch_order
    from netbuild.training import frozen_garbage

    from netbuild import backend

    backend.use(backend.resolve())  # NETBUILD_BACKEND: the jax worker's is jax
    workdir.mkdir(parents=True, exist_ok=True)
    trainer = netbuild_trainer(model, workdir, optimizer)
    n = len(model.data()[0])
    np.savez(orders_file(params), **{str(k): epoch_order(n, 0, k) for k in range(1, epochs + 1)})
    np.savez(params, **trainer.network.param_values())
    trainer.run_epoch(1)  # warm-up
    print(json.dumps({"ready": True, "threads": threads.resolve()}), flush=True)
    try:
        with frozen_garbage():  # as Trainer.run, which `netbuild train` calls
            _serve(lambda k: {"samples_per_second": trainer.run_epoch(k)["samples_per_second"]})
    finally:
        trainer.run_dir.unlock()


def orders_file(params: Path) -> Path:
    return params.with_name(params.stem + "-orders.npz")


class TorchRun:
    """The same training loop in PyTorch: batches of the same order (netbuild's, ``orders``:
    epoch -> permutation), the same optimizer, cross-entropy."""

    def __init__(self, model, params: dict, optimizer: str, orders: dict):
        import torch

        from models import OPTIMIZERS

        self.torch = torch
        self.model = model
        self.net = model.torch_model(params)
        self.opt = OPTIMIZERS[optimizer][1](torch, self.net.parameters())
        x, y = model.data()
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.orders = orders

    def epoch(self, epoch: int) -> float:
        """Train one epoch; return samples per second (the batch loop only, as netbuild's)."""
        torch = self.torch
        n, b = len(self.x), self.model.batch
        order = self.orders[str(epoch)]
        start = time.perf_counter()
        for idx in (order[i:i + b] for i in range(0, n, b)):  # netbuild.data.batches
            index = torch.from_numpy(idx)
            xb, yb = self.x[index], self.y[index]
            self.opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(self.net(xb), yb)
            loss.backward()
            self.opt.step()
            float(loss.item())
        return n / (time.perf_counter() - start)


def _torch_worker(model, optimizer: str, threads: int | None, params: Path) -> None:
    import numpy as np
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    with np.load(params) as values, np.load(orders_file(params)) as orders:
        run = TorchRun(model, dict(values), optimizer, dict(orders))
    run.epoch(1)  # warm-up
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    _serve(lambda k: {"samples_per_second": run.epoch(k)})


def _bound_worker(model, threads: int | None) -> None:
    """The bound at one thread: numpy's products (and the same products in cache); at the
    defaults: netbuild's own products on every core."""
    engine = "numpy" if threads == 1 else "netbuild"
    products = StepProducts(model, engine)
    products.epoch(1)
    print(json.dumps({"ready": True}), flush=True)
    _serve(lambda k: {"samples_per_second": products.epoch(k),
                      "hot": hot_products(model) if engine == "numpy" else None})


class Worker:
    """A worker process: started, then asked for one epoch at a time."""

    def __init__(self, kind: str, model: str, optimizer: str, threads: int | None,
                 workdir: Path, params: Path, epochs: int):
        env = _clean_env()
        pinned = None
        if kind == "jax":  # netbuild on its jax backend (JAX on the CPU here)
            kind, env["NETBUILD_BACKEND"] = "netbuild", "jax"
            if threads == 1:  # XLA's CPU client sizes its pool from the affinity (no flag does)
                core = min(os.sched_getaffinity(0))
                pinned = lambda: os.sched_setaffinity(0, {core})  # noqa: E731
        if threads is not None and kind in ("netbuild", "bound"):
            env["NETBUILD_THREADS"] = str(threads)
        if threads is not None and kind == "bound":  # numpy's OpenBLAS reads it at import
            env["OPENBLAS_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, __file__, "--worker", kind, "--models", model, "--optimizer",
               optimizer, "--workdir", str(workdir), "--params", str(params), "--rounds",
               str(epochs)]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, preexec_fn=pinned)
        self.ready = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a bench worker ended early (exit code {self.proc.wait()})")
        return json.loads(line)

    def epoch(self, k: int) -> dict:
        self.proc.stdin.write(f"epoch {k}\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


# -- the matrix-product bound --------------------------------------------------------------------
class StepProducts:
    """The MLP's matrix-product bound: an epoch of nothing but each training step's matrix
    products (float32) on the step's batches (the same epoch order as netbuild's), with the
    layouts the step uses (``x.T`` as a view) and outputs written into buffers allocated once.
    Only the products are timed, not the gather of each batch.

    ``engine`` "numpy": numpy's ``dot``, in the step's order (the one-thread bound); "netbuild":
    one compiled function of the same products on netbuild's own product op
    (:class:`netbuild.ops.dense.MatrixProduct`, on every core at the defaults; in the order
    PyTensor schedules them): what netbuild's step would reach if all else were free. The
    worker imports netbuild first (its thread settings, before numpy loads OpenBLAS)."""

    def __init__(self, model, engine: str = "numpy"):
        import numpy as np

        from models import MLP_WIDTHS

        rng = np.random.default_rng(0)
        widths = list(pairwise(MLP_WIDTHS))
        b = model.batch
        self.model = model
        self.x, _ = model.data()
        self.w = [rng.standard_normal(shape, dtype=np.float32) for shape in widths]
        self.dy = [rng.standard_normal((b, n), dtype=np.float32) for _, n in widths]
        if engine == "numpy":
            self.h = [np.empty((b, n), np.float32) for _, n in widths]      # layer outputs
            self.dw = [np.empty(shape, np.float32) for shape in widths]
            self.dx = [np.empty((b, k), np.float32) for k, _ in widths]
            self._step = self._numpy_step
        else:
            self._step = self._compiled()

    def _numpy_step(self, x) -> None:
        import numpy as np

        h = x
        for w, out in zip(self.w, self.h):
            np.dot(h, w, out=out)                                   # forward  h W
            h = out
        for i in reversed(range(len(self.w))):
            below = x if i == 0 else self.h[i - 1]
            np.dot(below.T, self.dy[i], out=self.dw[i])              # dW = h^T dy
            if i > 0:
                np.dot(self.dy[i], self.w[i].T, out=self.dx[i])      # dx = dy W^T

    def _compiled(self):
        """The same products as one function in netbuild's mode (its threads, its products),
        each written to a shared variable whose buffer the next call reuses."""
        import numpy as np
        import pytensor
        import pytensor.tensor as pt

        from netbuild import backend

        backend.configure()
        w = [pytensor.shared(a) for a in self.w]
        dy = [pytensor.shared(a) for a in self.dy]
        x = pt.matrix("x", dtype="float32")
        h, outs = x, []
        for wi in w:
            h = pt.dot(h, wi)
            outs.append(h)
        below = [x] + outs[:-1]
        outs += [pt.dot(below[i].T, dy[i]) for i in range(len(w))]
        outs += [pt.dot(dy[i], w[i].T) for i in range(1, len(w))]
        buffers = [pytensor.shared(np.empty((0, 0), "float32")) for _ in outs]
        return pytensor.function([x], [], updates=dict(zip(buffers, outs)),
                                 mode=backend.mode(keep_outputs=True), trust_input=True)

    def epoch(self, epoch: int) -> float:
        """Samples per second of the products alone."""
        from netbuild.data import batches, epoch_order

        n = len(self.x)
        if n < self.model.batch:
            raise SystemExit(f"the bound needs at least one full batch of {self.model.batch}")
        total = 0.0
        for idx in batches(n, self.model.batch, epoch_order(n, 0, epoch)):
            if len(idx) != self.model.batch:  # the buffers hold full batches
                continue
            x = self.x[idx]
            start = time.perf_counter()
            self._step(x)
            total += time.perf_counter() - start
        return (n - n % self.model.batch) / total


def hot_products(model, repeats: int = 20) -> float:
    """Samples/s if each of a step's products ran with its operands already in cache: each timed
    alone, ``repeats`` times in a row, median. Below what a step can reach (a step's products
    follow one another on new data), shown for reference."""
    import numpy as np

    from models import matmul_shapes

    rng = np.random.default_rng(0)
    total = 0.0
    for m, k, n in matmul_shapes(model):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        np.dot(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            np.dot(a, b)
            times.append(time.perf_counter() - start)
        total += statistics.median(times)
    return model.batch / total


# -- compile time and memory, each in a new process --------------------------------------------
def _clean_env() -> dict:
    """The environment the bench started with, less the thread variables: a user's defaults."""
    return {k: v for k, v in BASE_ENV.items() if k not in THREAD_VARS}


def compile_seconds(name: str, compiledir: Path) -> dict:
    env = _clean_env()
    flags = env.get("PYTENSOR_FLAGS", "")
    env["PYTENSOR_FLAGS"] = f"{flags},compiledir={compiledir}" if flags else f"compiledir={compiledir}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--compile-only", name], env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - start
    return result


def paired_gain(name: str, optimizer: str, rounds: int, workdir: Path) -> dict:
    """netbuild's gain from 1 thread to every core measured in one process: one Trainer, epochs
    on 1 thread and on every core alternating for ``rounds`` rounds, the median of the rounds'
    paired ratios (``bench/threads.py``, run at the user's defaults). Returns its row: ``gain``,
    and every epoch (``one``, ``many``)."""
    out = workdir / f"gain-{name}-{optimizer}.json"
    subprocess.run([sys.executable, str(HERE / "threads.py"), "--models", name, "--optimizers",
                    optimizer, "--rounds", str(rounds), "--out", str(workdir / "threads.md"),
                    "--json", str(out)], env=_clean_env(), capture_output=True, text=True, check=True)
    return json.loads(out.read_text())[0]


def _compile_only(name: str) -> None:
    from models import MODELS

    with tempfile.TemporaryDirectory() as tmp:
        trainer = netbuild_trainer(MODELS[name], Path(tmp))
        print(json.dumps({"function": trainer.fns.seconds}))


def peak_memory(workdir: Path, gib: float = 1.0) -> dict:
    """Max RSS of ``netbuild train`` (a small MLP, one epoch) on a ``gib`` GiB float32 npz."""
    import numpy as np

    width = 1024
    rows = int(gib * 2**30 / (4 * width))
    rng = np.random.default_rng(0)
    x = np.empty((rows, width), dtype=np.float32)
    for start in range(0, rows, 65536):
        x[start:start + 65536] = rng.random((min(65536, rows - start), width), dtype=np.float32)
    np.savez(workdir / "big.npz", x=x, y=rng.integers(0, 10, rows))
    size = (workdir / "big.npz").stat().st_size
    del x
    (workdir / "big.yaml").write_text("""
name: big
data: {train: big.npz, validation_split: 0.05}
model:
  input_shape: [1024]
  layers: [{type: dense, units: 32, activation: relu}, {type: dense, units: 10, activation: softmax}]
train: {loss: categorical_crossentropy, optimizer: {type: adam, learning_rate: 0.001},
        batch_size: 1024, epochs: 1, metrics: [accuracy]}
""")
    netbuild = Path(sys.executable).with_name("netbuild")
    start = time.perf_counter()
    proc = subprocess.Popen([str(netbuild), "train", str(workdir / "big.yaml"), "--quiet",
                             "--run-dir", str(workdir / "run-big")], env=_clean_env())
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("netbuild train on the 1 GiB npz failed")
    return {"npz_bytes": size, "max_rss_bytes": usage.ru_maxrss * 1024,
            "seconds": time.perf_counter() - start}


# -- the report ----------------------------------------------------------------------------------
def environment() -> dict:
    import numpy as np
    import pytensor
    import torch

    from netbuild import backend, threads
    from netbuild.compile import measure_gemm

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        numpy_blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        numpy_blas = f"{numpy_blas['name']} {numpy_blas['version']}"
    except (KeyError, TypeError):
        numpy_blas = "?"
    backend.configure()
    threads.apply(1)
    gflops = measure_gemm()
    threads.apply(threads.available_cores())
    # The one-thread bound runs on numpy's OpenBLAS, netbuild on scipy-openblas32: both are
    # shown, with netbuild's 1024 x 1024 sgemm rate on one thread.
    return {"cpu": cpu, "cores the process may use": threads.available_cores(),
            "python": platform.python_version(), "pytensor": pytensor.__version__,
            "torch": torch.__version__, "torch default threads": torch.get_num_threads(),
            "numpy": np.__version__,
            "netbuild blas": f"{backend.blas_source()} {_version('scipy-openblas32')}",
            "netbuild blas kernels": backend.blas_core(),
            "netbuild sgemm_gflops (1 thread)": round(gflops, 1),
            "numpy blas (the one-thread bound's)": numpy_blas,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(not set)")}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def measure(model_name: str, optimizer: str, setting: str, rounds: int, workdir: Path,
            with_bound: bool, with_jax: bool = False) -> dict:
    """One model, optimizer and setting: a netbuild and a PyTorch worker (and, on one thread with
    ``with_bound``, the bound's), then rounds of one epoch each, in turn (this machine's speed
    drifts: each ratio pairs epochs of the same round). Settings run one after another, not
    interleaved: with a 1-thread netbuild worker alternating beside it, a 2-thread netbuild worker
    trained the CNN 1.3x slower than alone or beside a PyTorch worker, which a user's single run
    never sees."""
    threads = SETTINGS[setting]
    wd = workdir / f"{model_name}-{optimizer}-{threads or 'default'}"
    params = wd / "params.npz"
    workers = []
    try:
        nb = Worker("netbuild", model_name, optimizer, threads, wd, params, rounds + 1)
        workers.append(nb)
        th = Worker("torch", model_name, optimizer, threads, wd, params, rounds + 1)
        workers.append(th)
        jx = None
        if with_jax:
            jx = Worker("jax", model_name, optimizer, threads, wd / "jax", wd / "jax-params.npz", rounds + 1)
            workers.append(jx)
        bound = None
        if with_bound:
            bound = Worker("bound", model_name, optimizer, threads, wd, params, rounds + 1)
            workers.append(bound)
        e = {"netbuild": [], "torch": [], "jax": [], "bound": [], "hot": []}
        tools = [("netbuild", nb), ("torch", th)] + ([("jax", jx)] if jx else [])
        for r in range(rounds):
            # who goes first turns round: none always follows another
            for tool, w in tools[r % len(tools):] + tools[:r % len(tools)]:
                e[tool].append(w.epoch(r + 2)["samples_per_second"])
            if bound:
                b = bound.epoch(r + 2)
                e["bound"].append(b["samples_per_second"])
                if b["hot"] is not None:
                    e["hot"].append(b["hot"])
    finally:
        for w in workers:
            w.close()
    result = {"model": model_name, "optimizer": optimizer, "setting": setting,
              "netbuild_threads": nb.ready["threads"], "torch_threads": th.ready["threads"],
              "netbuild": statistics.median(e["netbuild"]), "torch": statistics.median(e["torch"]),
              "ratio": statistics.median(n / t for n, t in zip(e["netbuild"], e["torch"])),
              "netbuild_all": e["netbuild"], "torch_all": e["torch"]}
    if jx:
        result.update(jax=statistics.median(e["jax"]), jax_all=e["jax"],
                      jax_ratio=statistics.median(j / n for j, n in zip(e["jax"], e["netbuild"])))
    if bound:
        result.update(bound=statistics.median(e["bound"]),
                      hot=statistics.median(e["hot"]) if e["hot"] else None,
                      of_bound=statistics.median(n / b for n, b in zip(e["netbuild"], e["bound"])),
                      bound_of_torch=statistics.median(b / t for b, t in zip(e["bound"], e["torch"])),
                      bound_all=e["bound"])
    return result


def write_results(path: Path, env: dict, rows: list[dict], compiles: dict, memory: dict | None,
                  rounds: int) -> str:
    from models import MODELS

    lines = ["# netbuild vs PyTorch (CPU)", "",
             f"Written by `make bench` ({time.strftime('%Y-%m-%d %H:%M')}). Each tool in a process "
             f"of its own; for each setting, medians of {rounds} rounds of one epoch each (netbuild "
             "and PyTorch, each first in every other round) after one warm-up epoch each; float32, "
             "softmax "
             "cross-entropy, same initial "
             "weights and batches. **defaults**: each tool at its own default thread count (no "
             "thread variables set); **1 thread**: netbuild `--threads 1`, PyTorch "
             "`torch.set_num_threads(1)`. Ratio: netbuild / PyTorch training samples/s, the "
             "median of each round's paired ratio.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if env["OPENBLAS_CORETYPE"] != "(not set)":
        lines += [f"This run's environment forces OpenBLAS's kernels (OPENBLAS_CORETYPE="
                  f"{env['OPENBLAS_CORETYPE']}): netbuild's matrix products run on those, not on "
                  "the ones OpenBLAS picks for this CPU; PyTorch's (MKL, oneDNN) do not read it.",
                  ""]
    lines += ["| model | optimizer | setting | threads (netbuild, PyTorch) | netbuild samples/s | "
              "PyTorch samples/s | ratio | target |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = TARGETS[r["setting"]][r["model"]]
        lines.append(f"| {MODELS[r['model']].title} | {r['optimizer']} | {r['setting']} | "
                     f"{r['netbuild_threads']}, {r['torch_threads']} | {_fmt(r['netbuild'])} | "
                     f"{_fmt(r['torch'])} | {r['ratio']:.2f}x | {target:.1f}x |")
    lines += ["", "Speed-up from 1 thread to all cores, same optimizer. **separate processes**: the "
              "median at the defaults / the median on one thread, from the workers above (minutes "
              "apart); **one process, paired**: netbuild alone (`bench/threads.py`), one Trainer, "
              f"{rounds} rounds of an epoch on 1 thread and one on every core (each first in every "
              "other round), the median of the rounds' paired ratios (seconds apart: this "
              "machine's speed swings up to 2x between runs minutes apart).", "",
              "| model | optimizer | netbuild, separate processes | netbuild, one process, paired | "
              "PyTorch, separate processes | netbuild target |", "|---|---|---|---|---|---|"]
    by = {(r["model"], r["optimizer"], r["setting"]): r for r in rows}
    for (model, optimizer, setting), r in by.items():
        one = by.get((model, optimizer, "1 thread"))
        if setting != "defaults" or not one:
            continue
        target = SPEEDUP_TARGETS.get(model)
        paired = r["speedup"].get("paired")
        lines.append(f"| {MODELS[model].title} | {optimizer} | {r['speedup']['netbuild']:.2f}x"
                     f" | {f'{paired:.2f}x' if paired else '-'} | {r['speedup']['torch']:.2f}x | "
                     f"{f'{target:.1f}x' if target else '-'} |")
    jax_rows = [r for r in rows if r.get("jax")]
    if jax_rows:
        lines += ["", "netbuild's two backends on this CPU, in the same rounds: `--backend jax` (PyTensor's "
                  "JAX linker, jax.jit on JAX's CPU build) against the default `c` backend. JAX on one "
                  "thread: its process pinned to one core (XLA's CPU client sizes its thread pool "
                  "from the process's affinity; no XLA flag changes it).", "",
                  "| model | optimizer | setting | c samples/s | jax samples/s | jax / c |",
                  "|---|---|---|---|---|---|"]
        for r in jax_rows:
            lines.append(f"| {MODELS[r['model']].title} | {r['optimizer']} | {r['setting']} | "
                         f"{_fmt(r['netbuild'])} | {_fmt(r['jax'])} | {r['jax_ratio']:.2f}x |")
    bound_rows = [r for r in rows if r.get("bound")]
    if bound_rows:
        lines += ["", "The MLP's matrix-product bound: an epoch of nothing but each training "
                  "step's matrix products on the step's batches, into buffers allocated once: what a step costs if everything else were free, in "
                  "the same rounds as the rows above. **1 thread**: numpy's products, in the step's "
                  f"order (target: netbuild at {BOUND_TARGET:.1f}x of it); **defaults**: "
                  "netbuild's own product op on every core (one compiled function of the "
                  "products alone, in PyTensor's order). Bound / "
                  "PyTorch: the most netbuild's step could reach against PyTorch's in those "
                  "rounds if all but its products were free (on one thread, netbuild's products "
                  "are single-threaded OpenBLAS calls, as numpy's). "
                  "\"Products in cache\" (1 thread) sums the same products each timed alone, "
                  "repeated with its operands in cache: faster than any step can run them.", "",
                  "| model | optimizer | setting | netbuild samples/s | bound samples/s | "
                  "netbuild / bound | target | bound / PyTorch | products in cache samples/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in bound_rows:
            target = f"{BOUND_TARGET:.1f}x" if r["setting"] == "1 thread" else "-"
            hot = _fmt(r["hot"]) if r.get("hot") else "-"
            lines.append(f"| {MODELS[r['model']].title} | {r['optimizer']} | {r['setting']} | "
                         f"{_fmt(r['netbuild'])} | {_fmt(r['bound'])} | {r['of_bound']:.2f}x | "
                         f"{target} | {r['bound_of_torch']:.2f}x | {hot} |")
    if compiles:
        lines += ["", "Compile time of the training function alone (`compile_train`, Adam, "
                  f"targets {COMPILE_COLD_TARGET:.0f} s cold and {COMPILE_WARM_TARGET:.0f} s warm); "
                  "a new, empty compile cache also builds PyTensor's own helper modules once per "
                  "machine, included in the process times:", "",
                  "| model | cold s | warm s | cold process s | warm process s |",
                  "|---|---|---|---|---|"]
        for name, c in compiles.items():
            lines.append(f"| {MODELS[name].title} | {c['cold']:.1f} | {c['warm']:.2f} | "
                         f"{c['cold_process']:.1f} | {c['warm_process']:.1f} |")
    lines += ["", "Every epoch (samples/s):", ""]
    for r in rows:
        bound = (f"; matmul bound {', '.join(_fmt(v) for v in r['bound_all'])}"
                 if r.get("bound_all") else "")
        jax = f"; netbuild jax {', '.join(_fmt(v) for v in r['jax_all'])}" if r.get("jax_all") else ""
        lines.append(f"- {r['model']}, {r['optimizer']}, {r['setting']}: netbuild "
                     f"{', '.join(_fmt(v) for v in r['netbuild_all'])}; PyTorch "
                     f"{', '.join(_fmt(v) for v in r['torch_all'])}{jax}{bound}")
        if r.get("paired_epochs"):
            one, many = r["paired_epochs"]
            lines.append(f"- {r['model']}, {r['optimizer']}, paired in one process: netbuild 1 "
                         f"thread {', '.join(_fmt(v) for v in one)}; every core "
                         f"{', '.join(_fmt(v) for v in many)}")
    if memory:
        lines += ["", f"Peak memory of `netbuild train` on a {memory['npz_bytes'] / 2**30:.2f} GiB "
                      f"float32 npz (small MLP, validation_split 0.05, one epoch): "
                      f"{memory['max_rss_bytes'] / 2**30:.2f} GiB max RSS (target "
                      f"{MEMORY_TARGET_GB} GB), {memory['seconds']:.0f} s."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    from models import MODELS, OPTIMIZERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-compile", action="store_true", help="skip the cold/warm compile timing")
    parser.add_argument("--no-memory", action="store_true", help="skip the 1 GiB peak-memory run")
    parser.add_argument("--no-bound", action="store_true", help="skip the MLP's matmul bound")
    parser.add_argument("--no-jax", action="store_true",
                        help="skip netbuild's jax backend (skipped anyway without JAX installed)")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--compile-only", help=argparse.SUPPRESS)
    for hidden in ("--worker", "--optimizer", "--workdir", "--params", "--threads"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.compile_only:
        return _compile_only(args.compile_only)
    if args.worker:
        model = MODELS[args.models]
        threads = int(args.threads) if args.threads else None
        if args.worker == "netbuild":
            return _netbuild_worker(model, args.optimizer, Path(args.workdir), Path(args.params),
                                    args.rounds)
        if args.worker == "torch":
            return _torch_worker(model, args.optimizer, threads, Path(args.params))
        return _bound_worker(model, threads)

    env = environment()
    with_jax = not args.no_jax and importlib.util.find_spec("jax") is not None
    rows, compiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            if not args.no_compile:
                cold = compile_seconds(name, tmp / f"cache-{name}")
                warm = compile_seconds(name, tmp / f"cache-{name}")
                compiles[name] = {"cold": cold["function"], "warm": warm["function"],
                                  "cold_process": cold["process"], "warm_process": warm["process"]}
            for optimizer in args.optimizers.split(","):
                with_bound = name == "mlp" and not args.no_bound
                by_setting = {}
                for setting in args.settings.split(","):
                    row = measure(name, optimizer, setting, args.rounds, tmp, with_bound, with_jax)
                    print(f"{name}, {optimizer}, {setting} (threads {row['netbuild_threads']}, "
                          f"{row['torch_threads']}): netbuild {row['netbuild']:,.0f}/s, torch "
                          f"{row['torch']:,.0f}/s, ratio {row['ratio']:.2f}", flush=True)
                    rows.append(row)
                    by_setting[setting] = row
                if "defaults" in by_setting and "1 thread" in by_setting:
                    d, one = by_setting["defaults"], by_setting["1 thread"]
                    d["speedup"] = {tool: d[tool] / one[tool] for tool in ("netbuild", "torch")}
                    pair = paired_gain(name, optimizer, args.rounds, tmp)
                    d["speedup"]["paired"] = pair["gain"]
                    d["paired_epochs"] = (pair["one"], pair["many"])
        memory = None if args.no_memory else peak_memory(tmp)
    print(write_results(Path(args.out), env, rows, compiles, memory, args.rounds))


if __name__ == "__main__":
    main()
