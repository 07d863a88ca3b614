"""`ptqlab quantize --gpus N`: the same command in N processes of one torch.distributed run, started by torch's
elastic launcher (what `torchrun --standalone --nproc-per-node N -m ptqlab quantize ...` does), so that one
machine's run and torchrun's multi-node runs are the same code (engine/distributed.py). A worker that fails or is
killed ends every worker: the launcher stops the others, and rank 0's unfinished output is removed as on any
failure (an output folder appears only complete)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

import torch

from ptqlab.errors import PtqlabError


def worker_arguments(argv: list[str]) -> list[str]:
    """The command line each worker runs: this one without --gpus."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            kept.append(arg)
    return kept


def launch(workers: int, device: str, verbose: bool = False) -> None:
    """Run this process's command line (without --gpus) in `workers` processes as one run. PtqlabError naming the
    first worker that failed, and how."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PtqlabError("--gpus starts its own workers: under torchrun, leave it out (torchrun's --nproc-per-node "
                          "says how many)")
    on_gpus = device not in ("cpu",) and torch.cuda.is_available()
    if not on_gpus and device != "cpu":  # CPU processes are asked for by name, never fallen into
        raise PtqlabError(f"--gpus {workers}: this machine has no GPU visible to torch; add --device cpu to calibrate "
                          f"in {workers} CPU processes, or leave --gpus out")
    if on_gpus and workers > torch.cuda.device_count():
        raise PtqlabError(f"--gpus {workers}: this machine has {torch.cuda.device_count()} GPU(s) visible to torch; "
                          f"use --gpus {torch.cuda.device_count()} or fewer")
    if device.startswith("cuda:"):
        raise PtqlabError(f"--gpus {workers} with --device {device}: worker r uses GPU r; use --device cuda (or auto), "
                          "and CUDA_VISIBLE_DEVICES to choose the GPUs")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not verbose:  # the launcher's own log lines (each of its loggers has its own level): its failures are ours to say
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=f"ptqlab-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        elastic_launch(config, sys.executable)("-m", "ptqlab", *worker_arguments(sys.argv[1:]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise PtqlabError(f"worker {rank} of {workers} {_ended(failure.exitcode)}: the run stopped on every worker "
                          "(the worker's own message, if any, is above)") from None
    except SignalException as e:  # the launcher's own handler: it has stopped the workers already
        raise PtqlabError(f"stopped by {signal.Signals(e.sigval).name}: every worker of {workers} was stopped; run the "
                          "same command again to go on") from None


def _ended(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"was killed (signal {-exitcode})"
    return f"failed (exit code {exitcode})"
