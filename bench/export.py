"""``make bench-onnx``: the shipped digits CNN's inference throughput, exported to ONNX and run in
onnxruntime, against ``netbuild predict``, in one run; written to bench/RESULTS-onnx.md.

The CNN (configs/digits-cnn.yaml) is trained for one epoch (throughput does not depend on the
weights) and exported with ``netbuild.Model.export_onnx``. Both then predict the same inputs
(the digits test set, repeated to ``--examples``) batch by batch, as ``netbuild predict`` does:
netbuild's compiled predict function and an onnxruntime session (CPU, its default graph
optimizations), each called once per batch of the pre-checked array. Settings: each at its
default threads (netbuild every core; onnxruntime's intra-op pool, one thread per core), then
both on one thread (``netbuild.threads.apply(1)``; ``intra_op_num_threads=1``). For each batch
size and setting, ``--rounds`` rounds alternate the two (each first in every other round); the
figures are medians, the ratio the median of each round's paired ratio.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

import netbuild  # noqa: E402  first, as the CLI does (netbuild.threads)

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from netbuild import backend, threads  # noqa: E402


def seconds_per_pass(fn, x: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        fn(x[i:i + batch])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--examples", type=int, default=4096, help="inputs per pass at batch 256")
    parser.add_argument("--examples-batch-1", type=int, default=1024, help="inputs per pass at batch 1")
    parser.add_argument("--out", default=str(HERE / "RESULTS-onnx.md"))
    args = parser.parse_args()
    import onnxruntime

    cores = threads.available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        spec = netbuild.load_spec(ROOT / "configs" / "digits-cnn.yaml", overrides=["train.epochs=1"])
        run = netbuild.train(spec, run_dir=Path(tmp) / "run")
        model = netbuild.load_model(run.path)
        exported = model.export_onnx(Path(tmp) / "digits-cnn.onnx")
        onnx_bytes = exported.path.read_bytes()
    test = np.load(ROOT / "configs" / "data" / "digits-test.npz")["x"]
    base = model.inputs(test)  # checked and shaped once, as `netbuild predict` does
    predict = model.predict_function()  # what `netbuild predict` calls per batch
    sessions = {}
    for setting, n_threads in (("defaults", 0), ("1 thread", 1)):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = n_threads  # 0: onnxruntime's default, one per core
        session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        sessions[setting] = lambda x, s=session: s.run(["y"], {"x": x})

    rows = []
    for setting, n_threads in (("defaults", cores), ("1 thread", 1)):
        threads.apply(n_threads)
        for batch, n in ((1, args.examples_batch_1), (256, args.examples)):
            x = np.ascontiguousarray(np.resize(base, (n, *base.shape[1:])))
            ours, theirs = [], []
            for fn in (predict, sessions[setting]):  # warm-up
                seconds_per_pass(fn, x[:batch * 8], batch)
            for r in range(args.rounds):
                pair = [(predict, ours), (sessions[setting], theirs)]
                for fn, out in pair[::1 if r % 2 == 0 else -1]:
                    out.append(n / seconds_per_pass(fn, x, batch))
            row = {"setting": setting, "batch": batch, "netbuild": statistics.median(ours),
                   "onnxruntime": statistics.median(theirs),
                   "ratio": statistics.median(t / o for o, t in zip(ours, theirs)),
                   "threads": n_threads, "ours": ours, "theirs": theirs}
            print(f"{setting}, batch {batch}: netbuild {row['netbuild']:,.0f}/s, onnxruntime "
                  f"{row['onnxruntime']:,.0f}/s ({row['ratio']:.2f}x)", flush=True)
            rows.append(row)
    threads.apply(cores)

    lines = ["# The digits CNN in onnxruntime against netbuild predict", "",
             f"Written by `make bench-onnx` ({time.strftime('%Y-%m-%d %H:%M')}). "
             + " ".join(__doc__.split("\n\n", 1)[1].split()), "",
             f"Machine: {cores} cores the process may use; netbuild {netbuild.__version__}, "
             f"onnxruntime {onnxruntime.__version__}, OpenBLAS kernels {backend.blas_core()}; "
             f"the ONNX file: opset {exported.opset}, {exported.nodes} nodes, "
             f"{exported.bytes / 2**10:,.0f} KiB.", "",
             "| setting | batch | netbuild threads | netbuild predict samples/s | onnxruntime "
             "samples/s | onnxruntime / netbuild |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['setting']} | {row['batch']} | {row['threads']} | {row['netbuild']:,.0f} "
                     f"| {row['onnxruntime']:,.0f} | {row['ratio']:.2f}x |")
    lines += ["", "Every round (samples/s):", ""]
    for row in rows:
        lines.append(f"- {row['setting']}, batch {row['batch']}: netbuild "
                     + ", ".join(f"{v:,.0f}" for v in row["ours"]) + "; onnxruntime "
                     + ", ".join(f"{v:,.0f}" for v in row["theirs"]))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
