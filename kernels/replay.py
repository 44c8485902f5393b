"""``replayable(fn)``: an eager launcher call's host work done once per layout, then replayed.

What a launcher does on the host (plans, buffers, kernels, their arguments) is a function of its arguments'
layout (shapes, strides, dtypes, 16-byte alignment, device), of its other arguments and of where launches go:
the dense paths read nothing back from the device (tests/common/test_graph_safety.py). Even planned once per
shape and launched through ``launch_kernel``'s shortcut, that work costs a few tens of microseconds per call in
Python. ``replayable(fn)`` keeps, per such layout, what ``fn`` did:

* the first call of a layout runs ``fn`` as it is (kernels compile, plans and counters are made);
* the second runs it again while recording: a torch dispatch mode sees every tensor ``fn`` allocates (an op
  other than an allocation or a view refuses the recording: the call is then not replayable), and
  ``launch_kernel`` reports each launch's compiled kernel, grid and full argument list (a launch that does
  not take the shortcut refuses it too);
* later calls replay: the same allocations (``torch.empty_strided``), the same views of them, and each
  compiled kernel called, through Triton's own runner (``CompiledKernel[grid]``, launch hooks honoured), with
  the call's tensors in place of the recorded ones, on the current stream of the tensors' device.

A tensor argument of a recorded launch is one of: a tensor argument of the call, an allocation of the call
or a view of one, or a tensor that existed before the call (a kept buffer, e.g. the elections' counters,
which are per stream: the stream is part of the key). The key holds every tensor argument's shape, strides,
dtype, device and alignment, which tensor arguments are the same object, every other argument by value, the
driver, the current stream, and the target of the launches. Not replayed: the interpreter (kernels are not
compiled), launches while something replaced ``JITFunction.run`` (the compile gate's capture, counters),
while a CUDA stream is being captured into a graph (the counters are then the graph's own), and anything
``VICINITY_ATTN_LAUNCH_REPLAY=0`` (read at import) switches off.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from . import fast_launch
from .runtime import _PLAN_CACHES, interpreting

ENABLED = os.environ.get("VICINITY_ATTN_LAUNCH_REPLAY", "1") not in ("", "0")
CACHE_SIZE = 1024
RECORD_TRIES = 3          # recordings refused in a row before a layout is left to the normal path
_Tensor = torch.Tensor
_NOT_REPLAYABLE = object()
_entries: dict = {}       # key -> Replay, an int (the calls seen so far) or _NOT_REPLAYABLE
_PLAN_CACHES.append(_entries)   # runtime.clear_plan_caches() forgets the recordings with the plans they used
_ALLOCATORS = frozenset({"empty.memory_format", "empty_strided.default", "empty_like.default",
                         "new_empty.default", "new_empty_strided.default"})


class Replay:
    """One recorded call: allocations, views of them, kept tensors, launches and where the results come from.
    Sources index a pool: the call's tensor arguments, then the allocations, then the views, then kept tensors."""

    __slots__ = ("allocs", "views", "launches", "results", "kept", "device")

    def __init__(self, allocs, views, kept, launches, results, device):
        self.allocs = allocs        # (size, stride, dtype) per allocation
        self.views = views          # (pool index of the base, size, stride, offset from the base's) per view
        self.kept = kept            # tensors that existed before the call
        self.launches = launches    # (runner, argument template, ((position, pool index), ...)) per launch
        self.results = results      # pool index (or None) per result; a bare int when fn returned one tensor
        self.device = device

    def __call__(self, tensors: list[_Tensor]):
        device = self.device
        pool = tensors
        for size, stride, dtype in self.allocs:
            pool.append(torch.empty_strided(size, stride, dtype=dtype, device=device))
        for base, size, stride, offset in self.views:
            base = pool[base]
            pool.append(base.as_strided(size, stride, base.storage_offset() + offset))
        pool.extend(self.kept)
        stream = driver.active.get_current_stream(device.index)
        for runner, template, slots in self.launches:
            args = template.copy()
            for position, source in slots:
                args[position] = pool[source]
            runner(*args, stream=stream)
        results = self.results
        if type(results) is int:
            return pool[results]
        return tuple(None if r is None else pool[r] for r in results)


def replayable(fn: Callable) -> Callable:
    """``fn`` (a launcher: tensors and hashable options in, tensors out) replayed per layout: see the module
    docstring. Its positional arguments make the key; keyword arguments are not accepted."""

    @functools.wraps(fn)
    def call(*args):
        if not ENABLED or interpreting() or JITFunction.run is not fast_launch._TRITON_RUN:
            return fn(*args)
        tensors, layout = [], []
        for a in args:
            if isinstance(a, _Tensor):
                if type(a) is not _Tensor:      # a subclass (a Parameter, a wrapper): its own semantics
                    return fn(*args)
                tensors.append(a)
                layout.append((a.shape, a.stride(), a.dtype, a.device, a.data_ptr() & 15 == 0))
            else:
                layout.append(a)
        if not tensors:
            return fn(*args)
        device = tensors[0].device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return fn(*args)
        try:
            active = driver.active
            stream = active.get_current_stream(device.index)
        except RuntimeError:     # no GPU driver: the normal path says so
            return fn(*args)
        key = (fn, active, stream, *layout)
        ids = [id(t) for t in tensors]
        if len(set(ids)) < len(ids):
            key = (*key, tuple(ids.index(i) for i in ids))
        try:
            entry = _entries.get(key, 0)
        except TypeError:        # an unhashable argument
            return fn(*args)
        if type(entry) is Replay:
            if device.type == "cuda":
                with torch.cuda.device(device):
                    return entry(tensors)
            return entry(tensors)
        if entry is _NOT_REPLAYABLE:
            return fn(*args)
        if entry < 1:            # first call of this layout: compile, plan, make the kept buffers
            _remember(key, 1)
            return fn(*args)
        out, replay = _record(fn, args, tensors, device)
        _remember(key, replay if replay is not None else
                  entry + 1 if entry < RECORD_TRIES else _NOT_REPLAYABLE)
        return out

    return call


def _remember(key, value) -> None:
    if len(_entries) >= CACHE_SIZE and key not in _entries:
        _entries.clear()
    _entries[key] = value


def clear() -> None:
    """Forget every recorded call (the next calls of each layout run and record afresh)."""
    _entries.clear()


def _record(fn: Callable, args: tuple, tensors: list[_Tensor], device: torch.device):
    """``fn(*args)`` and its :class:`Replay`, or None where the call cannot be replayed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    allocs: list[_Tensor] = []
    other_ops: list = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            name = f"{func._opname}.{func._overloadname}"
            if name in _ALLOCATORS:
                allocs.append(out)
            elif not func.is_view:
                other_ops.append(name)
            return out

    launches: list = []
    fast_launch.recording.launches = launches
    try:
        with Allocations():
            out = fn(*args)
    finally:
        fast_launch.recording.launches = None
    if other_ops or any(launch is None for launch in launches):
        return out, None
    return out, _build(tensors, allocs, launches, out, device)


def _build(tensors, allocs, launches, out, device) -> Replay | None:
    """The :class:`Replay` of a recorded call, or None where a tensor's source cannot be told."""
    pool_ids = {id(t): i for i, t in reversed(list(enumerate(tensors)))}
    n_inputs = len(tensors)
    storages: dict[int, int] = {}       # storage address -> pool index of the allocation
    alloc_specs = []
    for j, t in enumerate(allocs):
        address = t.untyped_storage().data_ptr()
        if t.numel() == 0 or address in storages or t.storage_offset() != 0:
            return None                 # an empty or shared storage: no way to tell its views apart
        storages[address] = n_inputs + j
        pool_ids.setdefault(id(t), n_inputs + j)
        alloc_specs.append((tuple(t.shape), t.stride(), t.dtype))
    views: list = []
    kept: list[_Tensor] = []
    input_storages: dict[int, int | None] = {}    # storage address -> the one argument on it (None: several)
    for i, t in enumerate(tensors):
        address = t.untyped_storage().data_ptr()
        if address not in input_storages:
            input_storages[address] = i
        elif input_storages[address] is not None and tensors[input_storages[address]] is not t:
            input_storages[address] = None
    n_fixed = n_inputs + len(allocs)

    def view_of(base: int, t: _Tensor, base_dtype: torch.dtype, base_offset: int) -> int | None:
        if t.dtype != base_dtype:
            return None                 # a view that reinterprets the bytes: as_strided would keep the dtype
        view = (base, tuple(t.shape), t.stride(), t.storage_offset() - base_offset)
        if view in views:
            return n_fixed + views.index(view)
        views.append(view)
        return n_fixed + len(views) - 1

    def source(t: _Tensor) -> int | None:
        index = pool_ids.get(id(t))
        if index is not None:
            return index
        address = t.untyped_storage().data_ptr()
        base = storages.get(address)
        if t.numel() == 0:
            return None                 # no storage to tell where it comes from
        if base is not None:
            if (tuple(t.shape), t.stride(), t.dtype) == alloc_specs[base - n_inputs] and t.storage_offset() == 0:
                index = base            # the whole allocation, as allocated
            else:
                index = view_of(base, t, alloc_specs[base - n_inputs][2], 0)
        elif address in input_storages:
            owner = input_storages[address]
            if owner is None:
                return None             # a view of one of several arguments on one storage: which one?
            index = view_of(owner, t, tensors[owner].dtype, tensors[owner].storage_offset())
        else:
            kept.append(t)
            index = -len(kept)          # fixed up below, once the views are known
        if index is None:
            return None
        pool_ids[id(t)] = index
        return index

    recorded = []
    for compiled, grid, full in launches:
        template, slots = [], []
        for position, a in enumerate(full):
            if type(a) is _Tensor:
                index = source(a)
                if index is None:
                    return None
                slots.append((position, index))
                template.append(None)
            elif isinstance(a, _Tensor):
                return None
            else:
                template.append(a)
        recorded.append((compiled[grid], template, tuple(slots)))
    single = type(out) is _Tensor
    results = []
    for t in ((out,) if single else out):
        if t is None:
            results.append(None)
        elif type(t) is _Tensor:
            index = source(t)
            if index is None:
                return None
            results.append(index)
        else:
            return None
    n_views = len(views)
    fix = lambda i: i if i is None or i >= 0 else n_fixed + n_views - 1 - i   # noqa: E731
    recorded = [(runner, template, tuple((p, fix(i)) for p, i in slots)) for runner, template, slots in recorded]
    results = [fix(i) for i in results]
    return Replay(tuple(alloc_specs), tuple(views), tuple(kept), tuple(recorded),
                  results[0] if single else tuple(results), device)
