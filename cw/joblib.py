"""
cw as a joblib backend: C{import cw.joblib} registers C{"cw"}, so that

    with joblib.parallel_config(backend="cw", master=ADDRESS):
        Parallel(n_jobs=-1)(delayed(f)(i) for i in ...)

runs on the cluster (scikit-learn's C{n_jobs=-1} too).  The backend is
L{cw.client.joblib_backend.ClusterBackend}; see there.

Layer rule: a front door above every layer, as C{cw.mp}: imports cw.client only.
"""

from __future__ import annotations

from cw.client.joblib_backend import NAME, ClusterBackend, register

register()

__all__ = ["NAME", "ClusterBackend", "register"]
