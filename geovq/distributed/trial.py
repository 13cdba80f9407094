"""What every geovq Tune trial shares, a sweep's (`geovq.distributed.tune`) and a search's (`geovq.search.trial`):
its device, its process set-up (thread limits, quiet stops), and the metric it reports when a GeovqError ended it."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from geovq.errors import GeovqError

#: the metric a trial reports when a GeovqError ended it: a cause a retry cannot fix (a corrupt file, a bad
#: setting), so Tune is not asked to retry it; retries are kept for crashes (a killed worker, a lost node)
GEOVQ_ERROR = "geovq_error"


def trial_device():
    """The torch device of this trial: the GPU Ray assigned it, else the CPU."""
    import ray
    import torch

    gpus = ray.get_gpu_ids()
    if not gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GeovqError(f"this trial was assigned GPU {gpus} by Ray, but torch sees no CUDA device on node "
                         f"{ray.get_runtime_context().get_node_id()} ({ray.util.get_node_ip_address()}): a CPU-only "
                         "torch build, or a node declaring GPUs it does not have")
    return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs


def quiet_stop_hook(unraisable: "sys.UnraisableHookArgs") -> None:
    """sys.unraisablehook of a trial's worker: Ray stops a phase's idle workers by SIGTERM, whose handler raises
    SystemExit wherever Python is; inside a weakref callback or a __del__ Python cannot raise it and prints it as
    "Exception ignored ... Traceback ... SystemExit: 1", which Ray forwards to the user's console (it did at the end
    of `geovq sweep digits --quick`, when the signal landed in such a callback). That exit is the intended one: it is not printed. Any other unraisable exception still is."""
    if issubclass(unraisable.exc_type, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


@contextmanager
def trial_process(threads: int) -> Iterator[None]:
    """A trial's worker process while the trial runs. Concurrent trials must not oversubscribe the cores: torch,
    faiss and the BLAS/OpenMP pools behind scikit-learn and scipy all get the trial's thread count. And the
    worker's stop at the end of the phase prints nothing (`quiet_stop_hook`)."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    sys.unraisablehook = quiet_stop_hook  # stays after the trial: the stop comes once the phase ends
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    with threadpool_limits(threads):
        yield
