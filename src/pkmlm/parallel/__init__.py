"""Several processes for one job: the environment torchrun gives (`env`), the launch around a run
(`launch`), the agreements between ranks (`agree`), how the global batch is split into data shards
(`data_shards`) and how a model is parallelised (`parallelize`). Needs torch and the model only."""

from pkmlm.parallel.env import DistInfo, init_distributed, rank_device

__all__ = ["DistInfo", "init_distributed", "rank_device"]
