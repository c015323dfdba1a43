"""``make bench``: netbuild against PyTorch on the CPU, side by side, written to bench/RESULTS.md.

For each model of :mod:`models` (MLP, CNN, LSTM): netbuild trains through the loop of
``netbuild train`` (``Trainer.run_epoch``); PyTorch (eager, CPU) trains the same network from the
same initial weights on the same batches in the same order. Epochs alternate, netbuild then
PyTorch, for ``--rounds`` rounds after one warm-up epoch each, and the medians are reported:
this machine is noisy. Both use ``--threads`` threads (default 1).

Also measured: the numpy matrix-product bound of the MLP (an epoch of nothing but each training
step's matrix products, in the step's order, on the step's batches; and, for reference, the sum of
the products each timed alone with its operands in cache), the compile time of each training
function with an empty compile cache
(a fresh PyTensor compiledir, in a new process) and with a warm one, and the peak memory (max RSS)
of ``netbuild train`` on a 1 GiB float32 npz.
"""

from __future__ import annotations

import os
import sys

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
# Before numpy loads its OpenBLAS: the matrix-product bound runs with the same threads.
for _var in ("NETBUILD_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from itertools import pairwise  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import MLP_WIDTHS, MODELS, Model, matmul_shapes  # noqa: E402

TARGETS = {"mlp": 1.5, "cnn": 1.0, "lstm": 1.0}
BOUND_TARGET = 0.8
COMPILE_COLD_TARGET, COMPILE_WARM_TARGET = 20.0, 2.0
MEMORY_TARGET_GB = 2.5


# -- netbuild ------------------------------------------------------------------------------------
def netbuild_trainer(model: Model, workdir: Path):
    """A Trainer for ``model`` on synthetic data in ``workdir`` (compiled: the cache may be warm)."""
    from netbuild.check import load_spec
    from netbuild.runs import RunDir
    from netbuild.train import Trainer

    x, y = model.data()
    np.savez(workdir / f"{model.name}.npz", x=x, y=y)
    spec_file = workdir / f"{model.name}.yaml"
    spec_file.write_text(model.spec_text(f"{model.name}.npz", epochs=1000))
    run = RunDir(workdir / f"run-{model.name}")
    run.create()
    return Trainer(load_spec(str(spec_file)), run)


# -- PyTorch -------------------------------------------------------------------------------------
class TorchRun:
    """The same training loop in PyTorch: batches of the same order, Adam, cross-entropy."""

    def __init__(self, model: Model, params: dict, seed: int = 0):
        import torch

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.model = model
        self.net = model.torch_model(params)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        x, y = model.data()
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.seed = seed

    def epoch(self, epoch: int) -> float:
        """Train one epoch; return samples per second (the batch loop only, as netbuild's)."""
        from netbuild.data import batches, epoch_order

        torch = self.torch
        n = len(self.x)
        order = epoch_order(n, self.seed, epoch)
        outputs = []
        start = time.perf_counter()
        for idx in batches(n, self.model.batch, order):
            index = torch.from_numpy(idx)
            xb, yb = self.x[index], self.y[index]
            self.opt.zero_grad(set_to_none=True)
            logits = self.net(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            loss.backward()
            self.opt.step()
            float(loss.item())
            outputs.append(logits.detach())
        return n / (time.perf_counter() - start)


# -- the matrix-product bound --------------------------------------------------------------------
class StepProducts:
    """The MLP's matrix-product bound: an epoch of nothing but each training step's matrix
    products (numpy, float32), in the step's order, on the step's batches (the same epoch order
    as netbuild's), with the layouts the step uses (``x.T`` as a view) and outputs written into
    buffers allocated once. Only the products are timed, not the gather of each batch."""

    def __init__(self, model: Model):
        rng = np.random.default_rng(0)
        widths = list(pairwise(MLP_WIDTHS))
        b = model.batch
        self.model = model
        self.x, _ = model.data()
        self.w = [rng.standard_normal(shape, dtype=np.float32) for shape in widths]
        self.h = [np.empty((b, n), np.float32) for _, n in widths]      # layer outputs
        self.dy = [rng.standard_normal((b, n), dtype=np.float32) for _, n in widths]
        self.dw = [np.empty(shape, np.float32) for shape in widths]
        self.dx = [np.empty((b, k), np.float32) for k, _ in widths]

    def _step(self, x: np.ndarray) -> None:
        h = x
        for w, out in zip(self.w, self.h):
            np.dot(h, w, out=out)                                   # forward  h W
            h = out
        for i in reversed(range(len(self.w))):
            below = x if i == 0 else self.h[i - 1]
            np.dot(below.T, self.dy[i], out=self.dw[i])              # dW = h^T dy
            if i > 0:
                np.dot(self.dy[i], self.w[i].T, out=self.dx[i])      # dx = dy W^T

    def epoch(self, epoch: int) -> float:
        """Samples per second of the products alone."""
        from netbuild.data import batches, epoch_order

        n = len(self.x)
        total = 0.0
        for idx in batches(n, self.model.batch, epoch_order(n, 0, epoch)):
            if len(idx) != self.model.batch:  # the buffers hold full batches
                continue
            x = self.x[idx]
            start = time.perf_counter()
            self._step(x)
            total += time.perf_counter() - start
        return (n - n % self.model.batch) / total


def hot_products(model: Model, repeats: int = 20) -> float:
    """Samples/s if each of a step's products ran with its operands already in cache: each timed
    alone, ``repeats`` times in a row, median. Below what a step can reach (a step's products
    follow one another on new data), shown for reference."""
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
def compile_seconds(name: str, compiledir: Path) -> dict:
    env = dict(os.environ)
    flags = env.get("PYTENSOR_FLAGS", "")
    env["PYTENSOR_FLAGS"] = f"{flags},compiledir={compiledir}" if flags else f"compiledir={compiledir}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--compile-only", name], env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - start
    return result


def _compile_only(name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = netbuild_trainer(MODELS[name], Path(tmp))
        print(json.dumps({"function": trainer.fns.seconds}))


def peak_memory(workdir: Path, gib: float = 1.0) -> dict:
    """Max RSS of ``netbuild train`` (a small MLP, one epoch) on a ``gib`` GiB float32 npz."""
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
                             "--run-dir", str(workdir / "run-big")])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("netbuild train on the 1 GiB npz failed")
    return {"npz_bytes": size, "max_rss_bytes": usage.ru_maxrss * 1024,
            "seconds": time.perf_counter() - start}


# -- the report ----------------------------------------------------------------------------------
def environment() -> dict:
    import pytensor
    import torch

    from netbuild import backend
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
    # The bound runs on numpy's OpenBLAS, netbuild on scipy-openblas32: both are shown, with
    # each one's 1024 x 1024 sgemm rate.
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": THREADS,
            "python": platform.python_version(), "pytensor": pytensor.__version__,
            "torch": torch.__version__, "numpy": np.__version__,
            "netbuild blas": f"{backend.blas_source()} {_version('scipy-openblas32')}",
            "netbuild sgemm_gflops": round(measure_gemm(), 1),
            "numpy blas (the bound's)": numpy_blas, "numpy sgemm_gflops": round(_numpy_gflops(), 1)}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def _numpy_gflops(n: int = 1024, repeats: int = 5) -> float:
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    np.dot(a, a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.dot(a, a)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def write_results(path: Path, env: dict, rows: list[dict], memory: dict | None, rounds: int) -> str:
    lines = ["# netbuild vs PyTorch (CPU)", "",
             f"Written by `make bench` ({time.strftime('%Y-%m-%d %H:%M')}). Medians of {rounds} "
             "alternating epochs (netbuild, PyTorch, netbuild, ...) after one warm-up epoch each; "
             "float32, Adam, softmax cross-entropy, same initial weights and batches.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| model | batch | netbuild samples/s | PyTorch samples/s | ratio | target | "
             "matmul bound samples/s | netbuild / bound | products in cache samples/s | "
             "netbuild / products in cache | compile cold s | compile warm s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bound = r.get("bound")
        lines.append(
            f"| {r['title']} | {r['batch']} | {_fmt(r['netbuild'])} | {_fmt(r['torch'])} | "
            f"{r['ratio']:.2f}x | {TARGETS[r['name']]:.1f}x | {_fmt(bound)} | "
            f"{_fmt(r['of_bound'], 2) + 'x' if bound else '-'} | {_fmt(r.get('hot'))} | "
            f"{_fmt(r['of_hot'], 2) + 'x' if bound else '-'} | "
            f"{_fmt(r.get('compile_cold'), 1)} | {_fmt(r.get('compile_warm'), 2)} |")
    lines.append("")
    lines.append("The matmul bound is an epoch of nothing but each training step's matrix "
                 "products (numpy, one thread), in the step's order, on the step's batches, into "
                 "buffers allocated once: what a step costs if everything else were free. "
                 "\"Products in cache\" sums the same products each timed alone, repeated with "
                 "its operands in cache: faster than any step can run them, shown for reference. "
                 "Every ratio is the median over rounds of each round's netbuild epoch against "
                 "the PyTorch epoch or the bound measured in the same round (the machine's speed "
                 "drifts by a third within a minute).")
    lines.append("")
    lines.append("Compile times are of the training function alone (`compile_train`); a new, empty "
                 "compile cache also builds PyTensor's own helper modules once per machine, "
                 "included in the process times below.")
    lines.append("")
    for r in rows:
        bound = (f"; matmul bound {', '.join(_fmt(v) for v in r['bound_all'])}"
                 if r.get("bound_all") else "")
        lines.append(f"- {r['name']}: netbuild epochs {', '.join(_fmt(v) for v in r['netbuild_all'])}; "
                     f"PyTorch {', '.join(_fmt(v) for v in r['torch_all'])}{bound}; cold-cache process "
                     f"{_fmt(r.get('cold_process'), 1)} s, warm-cache process "
                     f"{_fmt(r.get('warm_process'), 1)} s")
    if memory:
        lines += ["", f"Peak memory of `netbuild train` on a {memory['npz_bytes'] / 2**30:.2f} GiB "
                      f"float32 npz (small MLP, validation_split 0.05, one epoch): "
                      f"{memory['max_rss_bytes'] / 2**30:.2f} GiB max RSS (target "
                      f"{MEMORY_TARGET_GB} GB), {memory['seconds']:.0f} s."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn,lstm")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--no-compile", action="store_true", help="skip the cold/warm compile timing")
    parser.add_argument("--no-memory", action="store_true", help="skip the 1 GiB peak-memory run")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--compile-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_only:
        return _compile_only(args.compile_only)

    env = environment()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model = MODELS[name]
            row = {"name": name, "title": model.title, "batch": model.batch}
            if not args.no_compile:
                cold = compile_seconds(name, tmp / f"cache-{name}")
                warm = compile_seconds(name, tmp / f"cache-{name}")
                row.update(compile_cold=cold["function"], compile_warm=warm["function"],
                           cold_process=cold["process"], warm_process=warm["process"])
            trainer = netbuild_trainer(model, tmp)
            torch_run = TorchRun(model, trainer.network.param_values())
            products = StepProducts(model) if name == "mlp" else None
            trainer.run_epoch(1), torch_run.epoch(1)  # warm-up
            if products:
                products.epoch(1)
            nb, th, bound, hot = [], [], [], []
            for r in range(args.rounds):
                nb.append(trainer.run_epoch(r + 2)["samples_per_second"])
                th.append(torch_run.epoch(r + 2))
                if products:
                    bound.append(products.epoch(r + 2))
                    hot.append(hot_products(model))
            row.update(netbuild=statistics.median(nb), torch=statistics.median(th),
                       netbuild_all=nb, torch_all=th, bound=statistics.median(bound) if bound else None,
                       bound_all=bound, hot=statistics.median(hot) if hot else None)
            # paired, as the bound's ratios: each round's netbuild epoch against its PyTorch epoch
            row["ratio"] = statistics.median(n / t for n, t in zip(nb, th))
            if bound:  # paired: each round's epoch against the bound measured in the same round
                row["of_bound"] = statistics.median(n / b for n, b in zip(nb, bound))
                row["of_hot"] = statistics.median(n / h for n, h in zip(nb, hot))
            print(f"{name}: netbuild {row['netbuild']:,.0f}/s, torch {row['torch']:,.0f}/s, "
                  f"ratio {row['ratio']:.2f}" + (f", bound {row['bound']:,.0f}/s, netbuild / bound "
                                                 f"{row['of_bound']:.2f}" if bound else ""),
                  flush=True)
            trainer.run_dir.unlock()
            rows.append(row)
        memory = None if args.no_memory else peak_memory(tmp)
    print(write_results(Path(args.out), env, rows, memory, args.rounds))


if __name__ == "__main__":
    main()
