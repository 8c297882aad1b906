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
    Each call copies the inputs into the bucket's static buffers, launches the graph on the current stream and
    returns a copy of the static output, so the result stays valid after the next replay.
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

    def __call__(self, inputs: dict):
        import cupy

        sizes = {int(a.shape[0]) for a in inputs.values()}
        if len(sizes) != 1:
            raise ValueError(f"all inputs must have the same leading (batch) dimension, got {sorted(sizes)}")
        batch = sizes.pop()
        if batch not in self.buckets:
            raise ValueError(f"batch {batch} is not a bucket {self.buckets}; pad it to bucket_for({batch}) = "
                             f"{self.bucket_for(batch)}")
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(inputs)
        graph, static, out, stream = self._graphs[batch]
        if static.keys() != inputs.keys():
            raise ValueError(f"inputs {sorted(inputs)} differ from the captured ones {sorted(static)}")
        for name, a in inputs.items():
            if a.shape != static[name].shape or a.dtype != static[name].dtype:
                raise ValueError(f"input {name!r}: shape/dtype {a.shape}/{a.dtype} differ from the captured "
                                 f"{static[name].shape}/{static[name].dtype}")
        current = cupy.cuda.get_current_stream()
        for name, a in inputs.items():
            cupy.copyto(static[name], a)
        # The graph runs on its capture stream; order it after the copies and before whatever follows.
        stream.wait_event(current.record())
        graph.launch(stream)
        current.wait_event(stream.record())
        return out.copy()

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
