"""What a block asks of the device: aten ops that make the host wait, matmul dtypes, op counts.

A training step that waits on the host (a scalar read back, an output whose shape depends on
data) stalls the CUDA stream; a quantizer whose op count grows with the token count loops over
tokens in Python. Both are read from the aten ops a block dispatches, on any device.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that make the host wait for the device (a scalar read back, or an output whose shape
# depends on data).
HOST_SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "equal", "is_nonzero", "repeat_interleave",
}
# Ops that sync only on an accelerator (bincount reads its maximum back on CUDA); code may use
# them on CPU tensors and something else on CUDA, so they count only off the CPU.
DEVICE_SYNC_OPS = {"bincount", "histc"}
# Ops whose input dtype says at which precision the bulk of the FLOPs ran.
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "linear", "matmul"}


class OpAudit(TorchDispatchMode):
    """Records the aten ops a block dispatches: counts, host-synchronising ops, matmul dtypes.

    Boolean-mask indexing (``x[mask]``) is counted as a sync: its output shape depends on data.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.matmul_dtypes: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in HOST_SYNC_OPS or (name in DEVICE_SYNC_OPS and args[0].device.type != "cpu"):
            self.syncs[name] += 1
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                     for i in (args[1] if len(args) > 1 and args[1] is not None else ())):
            self.syncs["index(bool mask)"] += 1
        if name in MATMUL_OPS and args and isinstance(args[0], torch.Tensor):
            # addmm's first argument is the bias; the second is a matmul operand
            operand = args[1] if name in ("addmm", "baddbmm") and len(args) > 1 else args[0]
            self.matmul_dtypes[str(operand.dtype).replace("torch.", "")] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def cuda_sync_warnings(device: torch.device) -> Iterator[list[str]]:
    """On CUDA, collect synchronising CUDA calls with ``torch.cuda.set_sync_debug_mode("warn")``.

    Yields a list that holds the first line of each warning once the block ends (empty off CUDA).
    """
    record: list[str] = []
    if device.type != "cuda":
        yield record
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield record
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    record.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))
