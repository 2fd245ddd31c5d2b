"""Running one benchmark case: in this process, or in a fresh child process (how CPU peak memory is read).

Each child is forked from a clean server process that has imported torch and the model code
once, so children start fast, have run no OpenMP region (fork-safe) and own a fresh heap whose
peak resident set belongs to the case alone. The machine may be shared, so a child whose
resident set passes the memory limit is stopped rather than left to the kernel's OOM killer.
"""
from __future__ import annotations

import gc
import multiprocessing
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from vistok.eval.bench.measure import proc_kib

Case = dict[str, Any]
CaseFunction = Callable[[Case], dict[str, Any]]

# Imported once by the server process that forks the children.
PRELOAD = ["torch", "timm", "vistok.tokenizers.model", "vistok.tokenizers.quantizers"]
_context: multiprocessing.context.BaseContext | None = None


def run_case(function: CaseFunction, case: Case) -> dict[str, Any]:
    """``function(case)`` in this process; a failure becomes an ``{"error": ...}`` row, not a crash."""
    try:
        if case.get("threads"):
            torch.set_num_threads(case["threads"])
        return function(case)
    except torch.cuda.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}
    except Exception as error:  # a benchmark row that failed must not lose the others
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _child(function: CaseFunction, case: Case, connection) -> None:
    connection.send(run_case(function, case))
    connection.close()


def _forkserver() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def run_isolated(function: CaseFunction, case: Case, memory_limit_bytes: int | None) -> dict[str, Any]:
    """``run_case(function, case)`` in a fresh child; stopped when its RSS passes ``memory_limit_bytes``.

    ``function`` must be importable by name (a module-level function), as the child imports it.
    """
    context = _forkserver()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(function, case, send), daemon=True)
    process.start()
    send.close()
    killed_for_memory = threading.Event()

    def watch() -> None:
        status = f"/proc/{process.pid}/status"
        while process.is_alive():
            rss = proc_kib(status, "VmRSS")
            if rss is None:
                return
            if memory_limit_bytes and rss * 1024 > memory_limit_bytes:
                killed_for_memory.set()
                process.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result: dict[str, Any] | None = None
    try:
        result = receive.recv()
    except EOFError:
        pass
    process.join()
    watcher.join(timeout=1)
    if result is not None:
        return result
    if killed_for_memory.is_set():
        return {"error": f"stopped: resident memory passed the {memory_limit_bytes / 2**30:.1f} GiB limit "
                         "(--max-memory-gb)"}
    return {"error": f"child process died (exit code {process.exitcode}; killed for memory?)"}
