"""The parallel C linker: modules compiled up front land in PyTensor's own cache, and the
compiled function computes what numpy does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

#: A small graph of ops unlikely to be cached together elsewhere: a product, elementwise maths,
#: a reduction. Run in a fresh process with its own, empty compile cache.
PROGRAM = textwrap.dedent("""
    import json, sys
    import numpy as np
    from netbuild import backend
    backend.configure()
    if sys.argv[1] == "warm":  # g++'s flags for this CPU come from the cache, not detection
        from pytensor.link.c import cmodule
        cmodule.try_march_flag = lambda flags: (_ for _ in ()).throw(AssertionError("detected"))
    import pytensor, pytensor.tensor as pt
    from netbuild import linker
    counts = []
    original = linker.precompile
    linker.precompile = lambda nodes, workers=None: counts.append(original(nodes, workers)) or counts[-1]
    a, b = pt.matrix("a"), pt.matrix("b")
    out = (pt.tanh(pt.dot(a, b)) * 3.5 + 0.25).sum(axis=1)
    fn = pytensor.function([a, b], out, mode=backend.mode())
    rng = np.random.default_rng(0)
    x, y = rng.random((5, 4)).astype("float32"), rng.random((4, 3)).astype("float32")
    expected = (np.tanh(x @ y) * 3.5 + 0.25).sum(axis=1)
    nodes = fn.maker.fgraph.toposort()
    print(json.dumps({"compiled": counts, "error": float(np.abs(fn(x, y) - expected).max()),
                      "c_thunks": all(hasattr(t, "cthunk") for t in fn.vm.thunks),
                      "nodes": len(nodes)}))
""")


def _run(compiledir, phase: str) -> dict:
    env = dict(os.environ, PYTENSOR_FLAGS=f"compiledir={compiledir}")
    done = subprocess.run([sys.executable, "-c", PROGRAM, phase], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_precompiled_modules_are_cached_and_correct(tmp_path):
    cold = _run(tmp_path / "cache", "cold")
    assert cold["compiled"][0] >= 2  # several modules, compiled in parallel up front
    assert cold["error"] < 1e-5
    assert cold["c_thunks"]
    assert (tmp_path / "cache" / "netbuild-march-flags.json").is_file()
    warm = _run(tmp_path / "cache", "warm")  # a new process finds every module in the cache
    assert warm["compiled"] == [0]
    assert warm["error"] < 1e-5
