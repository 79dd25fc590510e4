"""Near-uniform rows at a large vocabulary: the head mass 1 - r, against a float64 full softmax.

On a flat row at V = 151,936 with K = 8 the head holds ~5e-5 of the mass. log r computed as the difference of
two float32 numbers near log V (log_tail - log_s) was off by ~1e-6 absolute: 0.8% of the head mass. It is now
-log(1 + head/tail), exact to float32 rounding.
"""

from __future__ import annotations

import torch

from pipeline.cache.schema import PRESETS, CodecParams, RowCodec
from pipeline.losses.temperature import DEFAULT_GRID_TEMPERATURES
from pipeline.teacher.stats import distribution_stats

V, K = 151_936, 8


def flat_rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.0, 1e-4, 0.01, 0.05, 0.1, 0.3], dtype=torch.float64)
    return torch.randn(len(scales), V, generator=g, dtype=torch.float64) * scales[:, None]


def test_head_mass_of_flat_rows_against_float64():
    z = flat_rows()
    logp = torch.log_softmax(z, -1)  # the truth, float64
    head_true = logp.topk(K, -1).values.exp().sum(-1)
    betas = torch.tensor([1.0 / t for t in DEFAULT_GRID_TEMPERATURES])
    tgt = torch.zeros(z.shape[0], dtype=torch.int64)
    st = distribution_stats(z.float(), tgt, K, betas, threads=1)
    head_from_r = -torch.expm1(st["tail_logprob"].double())
    assert float(((head_from_r - head_true) / head_true).abs().max()) < 1e-5
    # Through the real codec (the tail mass stored on its own, the head as gaps): documented <= 4.9e-4.
    params = CodecParams(vocab_size=V, temperatures=DEFAULT_GRID_TEMPERATURES, **{**PRESETS["default"], "top_k": K})
    codec = RowCodec(params)
    dec = codec.decode(codec.encode({k: x.numpy() for k, x in st.items()}, tgt.numpy()))
    head_dec = torch.from_numpy(dec["topk_logprobs"]).double().exp().sum(-1)
    assert float(((head_dec - head_true) / head_true).abs().max()) < 5e-4
