"""netbuild's jax backend against PyTorch on one GPU, at sizes worth one.

    python bench/gpu.py [--rounds N] [--cpu] [--out FILE]     (or: make bench-gpu)

The models of `make bench` made larger: the CNN on 3x32x32 images in batches of 256, the LSTM
with 256 units, the transformer block at width 256 over 128 steps. For each, with Adam, in one
process: netbuild (`--backend jax`: PyTensor's JAX linker, jax.jit) and PyTorch (eager, CUDA)
train from the same initial weights on the same synthetic batches in the same order; after a
warm-up epoch each (netbuild's includes its compile), ``--rounds`` epochs of each, alternating,
and the medians of their training samples/s. JAX is told not to take most of the GPU's memory
up front (XLA_PYTHON_CLIENT_PREALLOCATE=false), so both fit beside each other. Without a GPU it
stops, unless ``--cpu`` (a check of the script itself: its figures are not a GPU's). Writes
``--out`` (default bench/RESULTS-gpu.md). About 3 minutes on a current GPU.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ["NETBUILD_BACKEND"] = "jax"

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from models import MODELS as CPU_MODELS  # noqa: E402
from models import OPTIMIZERS, Model  # noqa: E402

#: `make bench`'s models, larger: the same layers (the LSTM's wider), other shapes and batches.
MODELS = [
    replace(CPU_MODELS["cnn"], name="cnn-gpu", title="CNN conv32-pool-conv64-pool-128-10, 3x32x32, batch 256",
            input_shape=(3, 32, 32), batch=256, examples=256 * 40),
    replace(CPU_MODELS["lstm"], name="lstm-gpu", title="LSTM 256 units, 50 steps x 32 features, batch 256",
            batch=256, examples=256 * 20, layers=CPU_MODELS["lstm"].layers.replace("units: 128", "units: 256")),
    replace(CPU_MODELS["transformer"], name="transformer-gpu",
            title="Transformer block: attention 4 heads, width 256, 128 steps, batch 64",
            input_shape=(128, 256), batch=64, examples=64 * 20),
]


class TorchOnDevice:
    """PyTorch's training loop on ``device``: the data there once, the same batches in the same
    order as netbuild's (its epoch order), Adam, cross-entropy."""

    def __init__(self, model: Model, params: dict, device: str, orders):
        import torch

        self.torch, self.model, self.orders = torch, model, orders
        self.net = model.torch_model(params).to(device)
        self.opt = OPTIMIZERS["adam"][1](torch, self.net.parameters())
        x, y = model.data()
        self.x, self.y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        self.device = device

    def epoch(self, epoch: int) -> float:
        torch = self.torch
        n, b = len(self.x), self.model.batch
        order = torch.from_numpy(self.orders(epoch)).to(self.device)
        start = time.perf_counter()
        for i in range(0, n, b):
            index = order[i:i + b]
            self.opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(self.net(self.x[index]), self.y[index])
            loss.backward()
            self.opt.step()
            float(loss.item())  # as netbuild reads each batch's loss
        return n / (time.perf_counter() - start)


def measure(model: Model, device: str, rounds: int, workdir: Path) -> dict:
    import jax
    from bench import netbuild_trainer

    from netbuild import backend
    from netbuild.data import epoch_order

    backend.use("jax")
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trainer = netbuild_trainer(model, workdir, "adam")
    params = trainer.network.param_values()
    n = len(model.data()[0])
    torch_run = TorchOnDevice(model, params, device, lambda k: epoch_order(n, 0, k))
    trainer.run_epoch(1)  # warm-up, with jax.jit's compile
    first = time.perf_counter() - start
    torch_run.epoch(1)
    e = {"netbuild": [], "torch": []}
    for r in range(rounds):
        runs = [("netbuild", lambda k: trainer.run_epoch(k)["samples_per_second"]), ("torch", torch_run.epoch)]
        for tool, run in runs[::1 if r % 2 == 0 else -1]:
            e[tool].append(run(r + 2))
    trainer.run_dir.unlock()
    return {"model": model, "first_epoch_s": first, "jax_device": str(jax.devices()[0]),
            "netbuild": statistics.median(e["netbuild"]), "torch": statistics.median(e["torch"]),
            "ratio": statistics.median(a / b for a, b in zip(e["netbuild"], e["torch"])), "all": e}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="run without a GPU (checks the script only)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-gpu.md")
    args = parser.parse_args()
    import jax
    import torch

    gpu = torch.cuda.is_available() and any(d.platform == "gpu" for d in jax.devices())
    if not gpu and not args.cpu:
        raise SystemExit("bench/gpu.py: no GPU seen by both JAX and PyTorch (JAX's devices: "
                         f"{jax.devices()}, torch.cuda.is_available(): {torch.cuda.is_available()}); "
                         "pass --cpu to check the script on the CPU")
    device = "cuda" if gpu else "cpu"
    # float32 products in full float32 on both sides: netbuild's jax ops ask for it (no TF32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            row = measure(model, device, args.rounds, Path(tmp) / model.name)
            print(f"{model.name}: netbuild jax {row['netbuild']:,.0f}/s, torch {row['torch']:,.0f}/s, "
                  f"ratio {row['ratio']:.2f}", flush=True)
            rows.append(row)
    name = torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine()
    lines = ["# netbuild (jax backend) vs PyTorch on " + ("a GPU" if gpu else "the CPU (a check of the script, not a GPU figure)"), "",
             f"Written by `make bench-gpu` ({time.strftime('%Y-%m-%d %H:%M')}) on {name}; JAX "
             f"{jax.__version__} (device {rows[0]['jax_device']}), PyTorch {torch.__version__}. Adam, "
             "float32, the same initial weights and batches; medians of "
             f"{args.rounds} epochs each, alternating, after a warm-up epoch each. Ratio: netbuild / "
             "PyTorch training samples/s, the median of each round's paired ratio.", "",
             "| model | netbuild jax samples/s | PyTorch samples/s | ratio | netbuild's first epoch s (compile included) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model'].title} | {r['netbuild']:,.0f} | {r['torch']:,.0f} | {r['ratio']:.2f}x | "
                     f"{r['first_epoch_s']:.1f} |")
    lines += ["", "Every epoch (samples/s):", ""]
    for r in rows:
        lines.append(f"- {r['model'].name}: netbuild {', '.join(f'{v:,.0f}' for v in r['all']['netbuild'])}; "
                     f"PyTorch {', '.join(f'{v:,.0f}' for v in r['all']['torch'])}")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
