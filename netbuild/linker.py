"""The linker netbuild compiles with: PyTensor's C virtual machine, its C modules built in parallel.

PyTensor compiles one C module per distinct op (about 30 for a small MLP's training step), one
g++ run after another, each under the compile cache's lock. Nearly all of a cold compile is
those g++ runs. :class:`ParallelCVMLinker` first generates the source of every op's module that
is not in the cache yet, runs g++ on all of them at once (one process per CPU, outside the lock),
and registers each result through the cache's own ``module_from_key``; the usual linking then
finds every module there. Nothing else changes: the modules, keys and cache are PyTensor's own,
so a warm cache serves both this linker and plain PyTensor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pytensor.graph.fg import FunctionGraph
from pytensor.link.c.basic import CLinker, get_module_cache
from pytensor.link.c.cmodule import dlimport, get_module_hash
from pytensor.link.c.op import COp
from pytensor.link.vm import VMLinker


@dataclass
class _Job:
    key: object
    module_hash: str
    clinker: CLinker
    location: str | None = None


class _Prebuilt:
    """What ``ModuleCache.module_from_key`` asks of a linker (``get_src_code`` and
    ``compile_cmodule``), for a module already compiled into ``job.location``."""

    def __init__(self, job: _Job):
        self.job = job

    def get_src_code(self) -> str:
        return self.job.clinker.get_src_code()

    def compile_cmodule(self, location: str):
        for name in os.listdir(self.job.location):
            shutil.move(os.path.join(self.job.location, name), location)
        name = self.job.clinker.get_dynamic_module().code_hash
        with open(os.path.join(location, "__init__.py"), "w"):
            pass
        return dlimport(os.path.join(location, f"{name}.so"))


def _job(node, cache) -> _Job | None:
    """The compile job of ``node``'s C module, or None when it is cached or has no C code."""
    if not isinstance(node.op, COp):
        return None
    try:
        node.op.prepare_node(node, None, None, "c")
        clinker = CLinker().accept(FunctionGraph(node.inputs, node.outputs), no_recycling=[])
        key = clinker.cmodule_key()
        if key is None or key in cache.entry_from_key:
            return None
        module_hash = get_module_hash(clinker.get_src_code(), key)
    except Exception:  # no C code here (or not for these types): the linker will say so
        return None
    if module_hash in cache.module_hash_to_key_data:
        return None
    return _Job(key, module_hash, clinker)


def _compile(job: _Job, dirname: str) -> _Job:
    """Run g++ for ``job`` into a fresh folder of the cache (a thread runs this; g++ is a
    separate process, so threads compile in parallel)."""
    cl = job.clinker
    mod = cl.get_dynamic_module()
    location = tempfile.mkdtemp(dir=dirname)
    try:
        cl.c_compiler().compile_str(
            module_name=mod.code_hash, src_code=mod.code(), location=location,
            include_dirs=cl.header_dirs(), lib_dirs=cl.lib_dirs(), libs=cl.libraries(),
            preargs=cl.compile_args(), py_module=False)
    except Exception:  # the usual sequential compile will raise it with its full message
        shutil.rmtree(location, ignore_errors=True)
        return job
    job.location = location
    return job


def precompile(nodes, workers: int | None = None) -> int:
    """Compile the C modules of ``nodes`` missing from the compile cache, ``workers`` at a time
    (default: one per CPU). Returns the number of modules compiled."""
    cache = get_module_cache()
    jobs: dict[str, _Job] = {}
    for node in nodes:
        job = _job(node, cache)
        if job is not None:
            jobs.setdefault(job.module_hash, job)
    if not jobs:
        return 0
    workers = workers or os.cpu_count() or 1
    # Longest first (source size stands for compile time), so that the workers finish together.
    order = sorted(jobs.values(), key=lambda j: -len(j.clinker.get_src_code()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(lambda j: _compile(j, str(cache.dirname)), order))
    compiled = 0
    for job in done:
        if job.location is None:
            continue
        try:
            cache.module_from_key(key=job.key, lnk=_Prebuilt(job))
            compiled += 1
        finally:  # another process may have compiled it meanwhile: ours is then unused
            shutil.rmtree(job.location, ignore_errors=True)
    return compiled


class ParallelCVMLinker(VMLinker):
    """PyTensor's CVM linker, with every missing C module compiled in parallel first."""

    def make_all(self, *args, **kwargs):
        if self.c_thunks is not False:
            precompile(self.fgraph.toposort())
        return super().make_all(*args, **kwargs)
