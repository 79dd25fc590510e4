"""The teacher worker's double host buffers (`pipeline.teacher.worker._HostBuffers`) on CPU.

The worker copies batch i + 1's results before it scatters batch i's, so two sets of buffers must
alternate. On CUDA the copies are asynchronous into pinned memory; that branch is two small functions
(`_host_empty`, `_copy_to_host`) that bench/gpu_suite.py (part cuda_paths) compares with this CPU path on
the same batches. Everything else (which set, when a buffer grows, the slices handed out) runs here.

    .venv/bin/python -m pytest tests/teacher/test_host_buffers.py -q
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.teacher import worker
from pipeline.teacher.worker import _HostBuffers


def batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """A batch's results as `rows_from_hidden` returns them, plus the target ids (float32, int64, 1-D, 2-D)."""
    g = torch.Generator().manual_seed(seed)
    return {"topk_ids": torch.randint(0, 1000, (n, 8), generator=g), "topk_logprobs": torch.randn(n, 8, generator=g),
            "tail_logprob": torch.randn(n, generator=g), "tail_shape": torch.randn(n, 4, generator=g),
            "target": torch.randint(0, 1000, (n,), generator=g)}


def test_results_of_a_batch_survive_the_next_batchs_copy():
    # The worker's order: copy batch i + 1, then read batch i. A single set of buffers would overwrite batch i.
    hb = _HostBuffers(torch.device("cpu"))
    b0, b1 = batch(50, 0), batch(50, 1)
    out0, done0 = hb.copy(b0)
    out1, done1 = hb.copy(b1)
    assert done0 is None and done1 is None  # off CUDA the copies are done when copy returns
    for name in b0:
        assert torch.equal(out0[name], b0[name]), name
        assert torch.equal(out1[name], b1[name]), name
        assert out0[name].data_ptr() != out1[name].data_ptr()  # two sets, not one
    # The third copy reuses the first set: results must be consumed within one further copy, as the worker does.
    out2, _ = hb.copy(batch(50, 2))
    assert all(out2[n].data_ptr() == out0[n].data_ptr() for n in b0)


def test_copies_are_host_buffers_not_the_sources():
    # The results handed out are the buffers' slices: later writes to the source do not reach them.
    hb = _HostBuffers(torch.device("cpu"))
    b = batch(10, 3)
    keep = {n: t.clone() for n, t in b.items()}
    out, _ = hb.copy(b)
    for name, t in b.items():
        assert out[name].data_ptr() != t.data_ptr()
        t.zero_()
        assert torch.equal(out[name], keep[name]), name


def test_buffers_grow_for_a_larger_batch_and_are_reused_for_smaller_ones():
    hb = _HostBuffers(torch.device("cpu"))
    out, _ = hb.copy(batch(10, 0))
    assert hb.sets[0]["topk_ids"].shape[0] == 1024  # a minimum size, so small batches never reallocate
    first = {n: hb.sets[0][n] for n in out}
    hb.copy(batch(10, 1))  # the other set
    out, _ = hb.copy(batch(700, 2))  # set 0 again, smaller than its buffers: the same storage
    assert all(hb.sets[0][n] is first[n] for n in out)
    assert out["topk_ids"].shape == (700, 8)
    hb.copy(batch(10, 3))
    big = batch(3000, 4)
    out, _ = hb.copy(big)  # larger than the buffers: set 0 grows
    assert hb.sets[0]["topk_ids"].shape[0] == 3000 and hb.sets[0]["topk_ids"] is not first["topk_ids"]
    assert all(torch.equal(out[n], big[n]) for n in big)


def test_a_new_dtype_or_row_shape_gets_a_new_buffer():
    hb = _HostBuffers(torch.device("cpu"))
    hb.copy({"x": torch.zeros(5, 4)})
    hb.copy({"x": torch.zeros(5, 4)})
    out, _ = hb.copy({"x": torch.ones(5, 4, dtype=torch.float64)})  # same name, other dtype
    assert out["x"].dtype == torch.float64 and bool((out["x"] == 1).all())
    hb.copy({"x": torch.zeros(5, 4)})
    out, _ = hb.copy({"x": torch.full((5, 6), 2.0, dtype=torch.float64)})  # other row shape
    assert out["x"].shape == (5, 6) and bool((out["x"] == 2).all())


def test_the_workers_order_over_many_batches_gives_every_row_back():
    # compute_shard's loop: copy batch i, finish batch i - 1 (scatter into the shard's arrays), keep batch i pending.
    hb = _HostBuffers(torch.device("cpu"))
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 2500, 12).tolist()
    sources = [batch(n, i) for i, n in enumerate(sizes)]
    total = sum(sizes)
    got = {n: np.zeros((total,) + tuple(t.shape[1:]), t.numpy().dtype) for n, t in sources[0].items()}
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pending = None

    def finish(p):
        i, out, done = p
        if done is not None:
            done.synchronize()
        for name, arr in got.items():
            arr[starts[i]: starts[i + 1]] = out[name].numpy()

    for i, b in enumerate(sources):
        out, done = hb.copy(b)
        if pending is not None:
            finish(pending)
        pending = (i, out, done)
    finish(pending)
    for name in got:
        want = np.concatenate([s[name].numpy() for s in sources])
        assert np.array_equal(got[name], want), name


def test_the_device_specific_calls_are_plain_off_cuda():
    # The two functions the CUDA path swaps in: unpinned buffers, synchronous copies, nothing to wait on.
    buf = worker._host_empty((4, 3), torch.float32, pinned=False)
    assert buf.shape == (4, 3) and buf.dtype == torch.float32 and not buf.is_pinned()
    src = {"a": torch.arange(12, dtype=torch.float32).reshape(4, 3)}
    assert worker._copy_to_host({"a": buf}, src, asynchronous=False) is None
    assert torch.equal(buf, src["a"])
