"""Sweeps and searches: one spec trained at many points, each point a task on Dask.

The stages, a module each:

- :mod:`.points`: a sweep's grid, expanded into points, each point's spec checked before
  anything runs; :mod:`.space`: a search's space of ranges and choices.
- :mod:`.cluster`: where they run (a local cluster, or a running scheduler's workers) and the
  runner that submits tasks and hears them finish; :mod:`.task`: the task a worker runs.
- :mod:`.state`: the folder on disk, held by one command at a time.
- :mod:`.sweep` and :mod:`.tune`: the two commands; the summary's rendering is
  :mod:`netbuild.report.summary`.
"""

from .cluster import default_workers, local_cluster, point_threads
from .errors import ArgumentError, SearchError, SearchInterrupted
from .points import Axis, Plan, Point, expand, parse_grid, plan, point_id, short_names
from .task import CANCELLED, COMPLETE, DONE, FAILED, PENDING, PRUNED, SKIPPED

__all__ = ["ArgumentError", "Axis", "CANCELLED", "COMPLETE", "DONE", "FAILED", "PENDING", "PRUNED",
           "Plan", "Point", "SKIPPED", "SearchError", "SearchInterrupted", "default_workers", "expand",
           "local_cluster", "parse_grid", "plan", "point_id", "point_threads", "short_names"]
