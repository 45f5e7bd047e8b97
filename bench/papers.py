"""The papers' own numbers quoted on the results page, each with its source.

They appear on ``docs/results.md`` only in columns labelled "paper"; every other number there is
measured by the benchmarks.
"""

from __future__ import annotations

NARANG = 'Narang et al. 2017, "Exploring Sparsity in Recurrent Neural Networks" (ICLR 2017)'
MOLCHANOV = 'Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning" (CVPR 2019)'

PAPERS: dict[str, dict[str, str]] = {
    "ds2_dense_size": {"value": "268 MB", "what": "Deep Speech 2, dense fp32", "source": NARANG},
    "ds2_sparse_size": {"value": "~32 MB", "what": "Deep Speech 2 pruned to about 90 % sparsity", "source": NARANG},
    "sparse_gemv_speedup": {"value": "3×–7×", "what": "sparse over dense GEMV, layers 1760 / 2560 / 3072, batch 1",
                            "source": NARANG},
    "gradual_vs_hard": {"value": "7–9 % better", "what": "gradual over hard pruning, relative error at equal sparsity",
                        "source": NARANG},
    "large_sparse_vs_small_dense": {"value": "large sparse better",
                                    "what": "large sparse model vs small dense model of about as many parameters",
                                    "source": NARANG},
    "taylor_fo_oracle": {"value": "> 0.9", "what": "Spearman correlation of Taylor FO with the oracle",
                         "source": MOLCHANOV},
    "magnitude_oracle": {"value": "lower than Taylor FO",
                         "what": "Spearman correlation of weight magnitude with the oracle", "source": MOLCHANOV},
}
