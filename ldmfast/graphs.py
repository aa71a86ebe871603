"""CUDA-graph capture and replay of whole pieces of work (a sampling loop, a decode).

A ``GraphCache`` maps a key, everything that changes the captured work (shapes, dtypes, device,
step count, sampler...), to one captured graph with its static input and output buffers. A call
copies the inputs into the static buffers, replays the graph and returns a copy of the static
output; a key it has not seen captures a new graph, so a shape change can never replay a stale
one. All graphs of a cache allocate from one memory pool (``torch.cuda.graph_pool_handle``):
their temporaries are dead once a replay ends and every static buffer stays referenced by its
entry, so replaying them one after another on one stream, in any order, is safe; replaying two
of them concurrently on different streams is not (and this class is not thread-safe).

What a graph reads stays where it was at capture: parameters updated in place
(``param.data.add_()``, LoRA merging) are seen by the next replay. Parameters whose storage was
replaced (``module.to(...)``, ``param.data = new``) are not, so every entry remembers the
addresses of the tensors it was captured against (``watch``) and is captured again when they
moved; the first call that sees them moved drops every graph captured on their old addresses,
whatever its key.

``capture`` is injectable: ``cuda_capture`` records a graph; ``eager_capture`` runs the same
function eagerly on every call (any device), which is how the cache logic and the captured body
are tested without a GPU, and a debugging aid on one.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

import torch

log = logging.getLogger("ldmfast")

__all__ = ["GraphCache", "capturing", "cuda_capture", "eager_capture", "tensor_spec"]


def _map(fn, obj):
    """fn applied to every tensor of a None / tensor / dict / tuple / list structure."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(fn, obj[k]) for k in sorted(obj)}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, v) for v in obj)
    raise TypeError(f"graph inputs must be tensors, or dicts/tuples/lists of them; got "
                    f"{type(obj).__name__}")


def _tensors(obj):
    out = []
    _map(out.append, obj)
    return out


def tensor_spec(obj):
    """A hashable description of a structure of tensors: shape, dtype and device of each (what a
    captured graph depends on; values are copied in at every replay)."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape), obj.dtype, obj.device, _channels_last(obj))
    if isinstance(obj, dict):
        return tuple((k, tensor_spec(obj[k])) for k in sorted(obj))
    if isinstance(obj, (tuple, list)):
        return tuple(tensor_spec(v) for v in obj)
    raise TypeError(f"no tensor spec for {type(obj).__name__}")


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last)


def _static_like(t: torch.Tensor) -> torch.Tensor:
    # Dense whatever the input's strides (an expanded batch-1 conditioning has stride 0), in
    # the input's memory format where it has one (the kernels captured depend on it: part of
    # the key through tensor_spec); copy_ converts at every call.
    fmt = torch.channels_last if _channels_last(t) else torch.contiguous_format
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)


@contextlib.contextmanager
def capturing(graph, stream, pool=None):
    """``torch.cuda.graph(graph, pool=pool, stream=stream)``, undone cleanly when the capture
    fails. When an op in the body cannot be captured, torch.cuda.graph's exit raises from
    ``capture_end`` (at cudaStreamEndCapture) before it restores the caller's stream and before
    the caching allocator stops sending that stream's allocations to the pool: the caller would
    go on running on the capture stream, allocating into the graph's pool. Here the stream is
    restored however the capture ends, and the pool is handed back as far as is safe
    (``_end_pool``); the error is raised unchanged. A graph of its own pool gets a fresh handle
    here, so that the pool is known after a failure (``graph.pool()`` refuses then)."""
    own = pool is None
    pool = torch.cuda.graph_pool_handle() if own else pool
    with torch.cuda.stream(stream):  # the outer context restores the caller's stream
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                yield
        except BaseException:
            _end_pool(pool, release=own)
            raise


def _end_pool(pool, release: bool) -> None:
    """After a failed capture into `pool`, where capture_end did not get as far as ending the
    allocator's routing to it: ends the routing and, for a pool of the graph's own, gives back
    the use of it that capture_begin took (the graph never will: it releases only after a
    completed capture_end), so its memory can be freed. A shared pool keeps that use: given back,
    a pool whose count reached zero while its blocks live on makes the next capture into it fail
    an internal assert. Where capture_end did end the routing, the graph holds the use and gives
    it back when destroyed, and nothing is done here (a second release would underflow it)."""
    end, free = (getattr(torch._C, n, None) for n in ("_cuda_endAllocateToPool", "_cuda_releasePool"))
    if end is None or free is None:
        return
    device = torch.cuda.current_device()  # the capture stream's (inside its stream context)
    try:
        end(device, pool)
    except RuntimeError:  # not routing to it: capture_end ended it, or capture_begin never began
        return
    if release:
        free(device, pool)


def cuda_capture(fn: Callable, static: dict, pool, warmup: int = 2, stream=None):
    """Captures ``fn(**static)`` in a CUDA graph allocating from ``pool``, on ``stream`` (a side
    stream of the current device; a new one when None).

    The warm-up runs on that stream first (as torch.cuda.graph requires: lazy initialisation,
    cuBLAS/cuDNN workspaces and algorithm choices happen outside the capture). The stream is
    passed to the capture: torch.cuda.graph's own default is one stream made on whichever device
    was current at its first use, wrong for a graph on another GPU. Returns (replay, static
    output)."""
    side = torch.cuda.Stream() if stream is None else stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(**static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capturing(graph, side, pool):
        out = fn(**static)
    return graph.replay, out


def eager_capture(fn: Callable, static: dict, pool=None, warmup: int = 0):
    """A stand-in for ``cuda_capture`` that captures nothing: "replay" runs ``fn`` eagerly on the
    static buffers and writes its result into the static output, so everything around the
    graph (keys, static copies, output copies) runs as it would with a real one."""
    out = fn(**static)

    def replay():
        new = fn(**static)
        for dst, src in zip(_tensors(out), _tensors(new)):
            dst.copy_(src)
    return replay, out


class _Entry:
    __slots__ = ("static", "replay", "out", "watch", "watch_ids", "replays", "fn")

    def __init__(self, static, replay, out, watch, watch_ids, fn):
        self.static, self.replay, self.out, self.watch = static, replay, out, watch
        self.watch_ids = watch_ids
        self.replays = 0
        # A graph holds no reference to what it reads: tensors fn's closure made before the
        # capture (outside the pool) would be freed and their memory reused under later
        # replays, so the entry keeps fn, and with it them, alive.
        self.fn = fn


class GraphCache:
    """Captured graphs by key, sharing one memory pool.

    ``run(key, fn, inputs, watch=())`` -> fn's output for ``inputs`` (a dict of tensors, or of
    dicts/tuples of tensors, or None), computed by replaying the graph captured for ``key``.
    ``fn`` must be a pure function of its tensor arguments and of state that ``key`` describes:
    Python values it reads at capture are frozen into the graph. ``watch``: tensors (parameters)
    the graph reads whose storage must not have moved since capture.
    """

    def __init__(self, capture: Optional[Callable] = None, warmup: int = 2,
                 max_entries: Optional[int] = None):
        self.capture = cuda_capture if capture is None else capture
        self.requires_cuda = self.capture is cuda_capture
        self.warmup = warmup
        self.max_entries = max_entries
        self._entries: dict = {}
        self._pool = None
        self._streams: dict = {}  # the capture stream per CUDA device index
        self.captures = 0  # graphs captured so far (recaptures included)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def keys(self):
        return list(self._entries)

    def discard(self, predicate: Callable) -> None:
        """Drops the graphs whose key satisfies ``predicate`` (the pool stays)."""
        for key in [k for k in self._entries if predicate(k)]:
            del self._entries[key]

    def clear(self) -> None:
        """Drops every graph and the pool (the memory returns to the caching allocator)."""
        self._entries.clear()
        self._pool = None
        self._streams.clear()

    def pool(self):
        if self._pool is None and self.requires_cuda:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    @staticmethod
    def _addresses(watch):
        return tuple(t.data_ptr() for t in watch)

    def _stream(self):
        """One capture stream per device: the graphs sharing the pool are captured on one."""
        index = torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream()
        return self._streams[index]

    def run(self, key, fn: Callable, inputs: dict, watch=()):
        if self.requires_cuda:
            if torch.is_autocast_enabled("cuda"):
                # Autocast caches the casts of parameters: captured, those copies are freed when
                # the autocast region ends while the graph still reads them.
                raise RuntimeError("CUDA graphs cannot be captured or replayed under "
                                   "torch.autocast (its cast cache would be captured); leave "
                                   "autocast or run without cuda_graph")
            # Capture, copies and replay on the inputs' GPU (its current stream), whichever
            # device is current: a graph records only the capturing device's stream.
            device = next((t.device for t in _tensors(inputs) if t.is_cuda), None)
            if device is not None:
                with torch.cuda.device(device):
                    return self._run(key, fn, inputs, watch)
        return self._run(key, fn, inputs, watch)

    def _run(self, key, fn, inputs, watch):
        watch = tuple(watch)
        addresses = self._addresses(watch)
        entry = self._entries.get(key)
        if entry is None or entry.watch != addresses:
            # A miss, or this key's tensors moved (.to()): every graph captured against these
            # same tensors at other addresses reads memory that is no longer theirs, so all of
            # them go, not only this key's. A replay skips the scan: each miss or move leaves
            # the graphs on these tensors all on the current addresses.
            ids = tuple(map(id, watch))
            stale = [k for k, e in self._entries.items()
                     if (k == key or e.watch_ids == ids) and e.watch != addresses]
            if stale:
                log.info("ldmfast graphs: parameters moved since capture; dropping %d graph(s)", len(stale))
                for k in stale:
                    del self._entries[k]
            entry = self._capture(key, fn, inputs, addresses, ids)
        else:
            for name, value in inputs.items():
                for dst, src in zip(_tensors(entry.static[name]), _tensors(value)):
                    dst.copy_(src)
            entry.replay()
        entry.replays += 1
        return _map(torch.clone, entry.out)

    def _capture(self, key, fn, inputs, addresses, ids):
        if self.max_entries is not None and len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))  # the oldest
        static = {}
        for name, value in inputs.items():
            static[name] = _map(_static_like, value)
            for dst, src in zip(_tensors(static[name]), _tensors(value)):
                dst.copy_(src)
        extra = {"stream": self._stream()} if self.requires_cuda else {}
        try:
            replay, out = self.capture(fn, static, self.pool(), warmup=self.warmup, **extra)
        except RuntimeError as e:  # torch's words name the CUDA call, not what to do about it
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeError(f"ldmfast: this work could not be captured in a CUDA graph ({first}); "
                               f"run it without cuda_graph=True. Graph key: {key!r}") from e
        if self.requires_cuda:
            # The capture itself computed nothing: run it once for these inputs.
            replay()
        entry = _Entry(static, replay, out, addresses, ids, fn)
        self._entries[key] = entry
        self.captures += 1
        log.debug("ldmfast graphs: captured %s (%d graphs)", key, len(self._entries))
        return entry
