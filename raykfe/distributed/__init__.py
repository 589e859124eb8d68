"""raykfe on Ray: the only package that imports ray.

* :mod:`.cluster`    join a cluster (``ray.address`` / ``RAY_ADDRESS``) or start a local one;
* :mod:`.collective` bucketed all-reduce of K-FAC sums (upper triangles only);
* :mod:`.actors`     eigendecomposition actors fed from a largest-first work queue; score directions;
* :mod:`.workers`    Ray Train worker functions: statistics on data shards, data-parallel training;
* :mod:`.backend`    :class:`RayBackend`, the Ray implementation of the pipeline's backend.
"""

__all__ = ["RayBackend", "connect"]


def __getattr__(name):  # import ray only when it is really needed
    if name == "RayBackend":
        from .backend import RayBackend

        return RayBackend
    if name == "connect":
        from .cluster import connect

        return connect
    raise AttributeError(name)
