"""CUDA-graph capture and replay of decode steps, one graph per padded batch size ("bucket")."""

from __future__ import annotations

import bisect

#: Default padded decode batch sizes (vLLM captures a similar ladder).
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphRunner:
    """Captures ``step(inputs) -> output`` once per bucket and replays it with new inputs.

    ``step`` receives a dict of CuPy arrays (the runner's static buffers, leading dimension = bucket size) and returns
    a CuPy array; it must be capturable: no host synchronisation and no new device allocation after its first
    (eager, warm-up) call. :class:`~cubsattn.backend.BlocksparseFlashAttentionImpl.forward` on decode metadata built
    with ``pad_to=bucket`` and a fixed ``block_table_width`` qualifies.

    Parameters
    ----------
    step : callable
    buckets : increasing ints
        Batch sizes to capture; a batch of ``n`` sequences runs in the smallest bucket ``>= n`` (pad it with
        :meth:`bucket_for`).

    Notes
    -----
    ``runner(inputs)`` copies the inputs into the bucket's static buffers, replays, and returns a copy of the static
    output, so the result stays valid after the next replay. The fastest loop writes its inputs straight into the
    buffers of :meth:`static_inputs` and calls :meth:`replay`, which returns the static output itself (valid until
    the next replay): no copies besides the graph's own kernels.
    """

    def __init__(self, step, *, buckets=DEFAULT_BUCKETS):
        self.step = step
        self.buckets = tuple(sorted(int(b) for b in buckets))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {buckets}")
        self._graphs: dict[int, tuple] = {}

    def bucket_for(self, batch: int) -> int:
        """The smallest bucket ``>= batch``."""
        i = bisect.bisect_left(self.buckets, int(batch))
        if i == len(self.buckets):
            raise ValueError(f"batch {batch} exceeds the largest CUDA-graph bucket ({self.buckets[-1]})")
        return self.buckets[i]

    @property
    def captured(self) -> tuple[int, ...]:
        """Buckets captured so far."""
        return tuple(sorted(self._graphs))

    def static_inputs(self, inputs: dict) -> dict:
        """The static input buffers of ``inputs``' bucket (capturing it first, with ``inputs`` as the example)."""
        return self._graph_for(inputs)

    def replay(self, batch: int):
        """Replay the captured graph of bucket ``batch`` on the current contents of its static inputs; returns the
        static output (overwritten by the next replay)."""
        if batch not in self._graphs:
            raise ValueError(f"bucket {batch} is not captured yet (captured: {self.captured})")
        import cupy

        graph, _, out, stream = self._graphs[batch]
        current = cupy.cuda.get_current_stream()
        # The graph runs on its capture stream; order it after prior work and before whatever follows.
        stream.wait_event(current.record())
        graph.launch(stream)
        current.wait_event(stream.record())
        return out

    def __call__(self, inputs: dict):
        import cupy

        static = self._graph_for(inputs)
        batch = next(iter(inputs.values())).shape[0]
        for name, a in inputs.items():
            if a.data.ptr != static[name].data.ptr:
                cupy.copyto(static[name], a)
        return self.replay(batch).copy()

    def _graph_for(self, inputs: dict):
        sizes = {int(a.shape[0]) for a in inputs.values()}
        if len(sizes) != 1:
            raise ValueError(f"all inputs must have the same leading (batch) dimension, got {sorted(sizes)}")
        batch = sizes.pop()
        if batch not in self.buckets:
            raise ValueError(f"batch {batch} is not a bucket {self.buckets}; pad it to bucket_for({batch}) = "
                             f"{self.bucket_for(batch)}")
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(inputs)
        static = self._graphs[batch][1]
        if static.keys() != inputs.keys():
            raise ValueError(f"inputs {sorted(inputs)} differ from the captured ones {sorted(static)}")
        for name, a in inputs.items():
            if a.shape != static[name].shape or a.dtype != static[name].dtype:
                raise ValueError(f"input {name!r}: shape/dtype {a.shape}/{a.dtype} differ from the captured "
                                 f"{static[name].shape}/{static[name].dtype}")
        return static

    def _capture(self, inputs: dict):
        import cupy

        static = {name: a.copy() for name, a in inputs.items()}
        self.step(static)                                 # eager warm-up: compiles kernels, sizes workspaces
        stream = cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.get_current_stream().synchronize()
        with stream:
            stream.begin_capture()
            try:
                out = self.step(static)
            finally:
                graph = stream.end_capture()
        return graph, static, out, stream
