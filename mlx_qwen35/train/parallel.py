"""Data-parallel training in several processes on one machine: each process holds the same model, computes the
loss and gradients of its own part of every step's rows, and the sums are added across processes
(`mx.distributed.all_sum`, MLX's ring backend over localhost) before the same optimizer step in each. On a CPU,
MLX runs one graph's ops one after another on one core, and the small ops of two threads in one process largely
in turn (`scripts/thread_scaling.py`), while two processes each have a core (docs/benchmarks.md: the decoder's
steps 1.09x two threads, the tower's pretraining, which threads did not split, 1.48x one process).

`over_processes("workers")` makes a function run so: called with workers > 1 outside a group, it starts that many
processes (spawned: fresh interpreters) that each call it inside one group, and returns rank 0's result. Inside
the function `group()` says which rank this is; only rank 0 writes and prints. A job started by `mlx.launch`
is such a group already."""

import functools
import inspect
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import wait

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..platform import blas_threads


def group():
    """The group of processes this process trains in: size 1 when it was not started as one of several."""
    return mx.distributed.init()


def rank() -> int:
    return group().rank()


def parts(count: int) -> int:
    """How many parts work dealt out among this group's processes is cut into: `count`, or as many as the group
    has processes when it has more (each process takes every size-th part)."""
    return max(count, group().size())


def _flat(leaves) -> mx.array:
    """The arrays of `tree_flatten`'s `leaves` as one float32 vector."""
    return mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in leaves])


def all_sum(tree, group):
    """Every array of `tree` summed across the processes of `group`, in one exchange."""
    leaves = tree_flatten(tree)
    flat = mx.distributed.all_sum(_flat(leaves), group=group)
    offsets = np.cumsum([0] + [v.size for _, v in leaves]).tolist()
    return tree_unflatten([(k, flat[a:b].reshape(v.shape).astype(v.dtype))
                           for (k, v), a, b in zip(leaves, offsets, offsets[1:])])


def check_in_step(tree, what: str):
    """Raise when the processes of this group hold different arrays in `tree` (they must take the same steps): a
    sum and a sum of squares of all of it, compared exactly."""
    members = group()
    if members.size() == 1:
        return
    flat = _flat(tree_flatten(tree))
    checks = mx.distributed.all_gather(mx.stack([flat.sum(), (flat * flat).sum()])[None], group=members)
    if not bool((checks == checks[0]).all()):
        raise RuntimeError(f"the training processes hold different {what}: they no longer take the same steps")


def over_processes(parameter: str = "workers", check=None):
    """Decorator: a call whose `parameter` is above 1, made outside a group, runs in that many processes
    (`run_in_processes`). `check`, given the call's arguments by name (defaults filled in), runs first in the
    calling process: what it raises is raised before any process starts."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def call(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            workers = arguments.arguments[parameter]
            if isinstance(workers, int) and workers > 1 and group().size() == 1:
                if check is not None:
                    check(arguments.arguments)
                return run_in_processes(call, workers, *args, **kwargs)
            return function(*args, **kwargs)

        return call

    return decorate


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_in_processes(function, workers: int, /, *args, **kwargs):
    """`function(*args, **kwargs)` in `workers` spawned processes (fresh interpreters) joined in one ring group on
    localhost, each with its share of the machine's cores for BLAS; returns rank 0's result. An exception in any
    process is raised here (the others are stopped), with the rank's traceback as a note; so is a process that
    dies without one."""
    ports = free_ports(workers)
    with tempfile.TemporaryDirectory(prefix="mlx-qwen35-group-") as directory:
        hostfile = os.path.join(directory, "hosts.json")
        with open(hostfile, "w") as f:
            json.dump([[f"127.0.0.1:{port}"] for port in ports], f)
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        pipes = [context.Pipe(duplex=False) for _ in range(workers)]
        processes = [context.Process(target=_rank_main, daemon=True, name=f"rank {rank}",
                                     args=(rank, hostfile if workers > 1 else None, threads, os.getpid(),
                                           pipes[rank][1], function, args, kwargs))
                     for rank in range(workers)]
        for process in processes:
            process.start()
        for _, sender in pipes:
            sender.close()
        try:
            return _first_outcome(processes, [receiver for receiver, _ in pipes])
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
                process.join()


def _end_with(starter: int):
    """End this process once the process that started it is gone (killed, say): a rank left alone would wait on
    the others for ever, spinning a core."""
    while os.getppid() == starter:
        time.sleep(1.0)
    os._exit(1)


def _first_outcome(processes, receivers):
    """Rank 0's result once every rank has finished, or the first exception any rank reports."""
    result, waiting = None, dict(zip(receivers, processes))
    while waiting:
        for ready in wait(list(waiting)):
            process = waiting.pop(ready)
            try:
                outcome, value = ready.recv()
            except EOFError:  # died without a word (killed, out of memory)
                process.join()
                raise RuntimeError(f"training process {process.name} ended with exit code {process.exitcode} "
                                   "and no result") from None
            except Exception as error:  # an exception that pickled but does not unpickle
                raise RuntimeError(f"training process {process.name} failed, and its error could not be read "
                                   f"back: {error}") from None
            if outcome == "error":
                raise value
            if process.name == "rank 0":
                result = value
    return result


def _rank_main(rank: int, hostfile: str | None, threads: int, starter: int, sender, function, args, kwargs):
    threading.Thread(target=_end_with, args=(starter,), daemon=True).start()
    try:
        if hostfile:  # one process alone is no ring
            os.environ.update(MLX_RANK=str(rank), MLX_HOSTFILE=hostfile)
            mx.distributed.init(backend="ring", strict=True)
        with blas_threads(threads):
            sender.send(("ok", function(*args, **kwargs)))
    except BaseException as error:  # reported to the starting process, which raises it
        error.add_note(f"in training process rank {rank}:\n" + "".join(traceback.format_exception(error)).strip())
        try:
            sender.send(("error", error))
        except Exception:  # an exception that does not pickle
            sender.send(("error", RuntimeError(f"in training process rank {rank}: "
                                               + "".join(traceback.format_exception(error)).strip())))
        sys.exit(1)
