"""Run a test module's ``check_*`` functions on W gloo processes on 127.0.0.1.

One spawn runs every check of the module (starting processes is the slow part); a check
does its collectives first and its assertions last, so a failing assertion on one rank
never leaves the others waiting. Every collective has a timeout and the join a deadline,
so a hang fails the test instead of stalling CI. A check takes ``(rank, world, tmp_dir)``.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checks_of(module) -> dict:
    return {name: fn for name, fn in vars(module).items() if name.startswith("check_") and callable(fn)}


def _worker(rank, world, port, module_name, out_dir, timeout_s):
    torch.set_num_threads(1)
    checks = checks_of(importlib.import_module(module_name))
    results = {}
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        for name, fn in checks.items():
            try:
                fn(rank, world, out_dir)
                results[name] = None
            except AssertionError:
                results[name] = traceback.format_exc()
            except Exception:  # the ranks may be out of step now: stop here
                results[name] = traceback.format_exc()
                break
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def spawn_checks(module_name: str, world: int, out_dir: str, timeout_s: int = 30, deadline_s: int = 120) -> dict:
    """{rank: {check name: None or the traceback}} after running the module's checks."""
    ctx = mp.start_processes(
        _worker, args=(world, free_port(), module_name, out_dir, timeout_s), nprocs=world, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} gloo processes still running after {deadline_s} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = {}
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results[rank] = json.load(f)
    return results


def assert_check_passed(results: dict, check: str) -> None:
    failures = []
    for rank, res in results.items():
        if check not in res:
            failures.append(f"rank {rank}: not run (an earlier check failed with an exception)")
        elif res[check] is not None:
            failures.append(f"rank {rank}:\n{res[check]}")
    assert not failures, f"{check} on {len(results)} ranks:\n" + "\n".join(failures)
