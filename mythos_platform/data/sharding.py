"""How the training workers share the data: a fixed order (the default) or Ray Data's streaming split.

Ray Train's default (`ray.train.DataConfig`) hands each dataset to the workers with
`Dataset.streaming_split`, whose splitter gives a block to whichever worker asks next and keeps no
order (Ray Data's OutputSplitter "does not provide any ordering guarantees"), and Ray Data's
operators emit blocks in completion order unless `preserve_order` is set. Two launches of one
config then see different batches from the first epoch on, and a run resumed from a checkpoint
does not replay what an uninterrupted run would have trained on.

`FixedOrder` (data.order: fixed) makes the order a pure function of the config and the position:
the dataset is computed with `preserve_order` (so every block, shuffled with its seed, lands at the
same place on every launch), materialized, and cut by rows into `world_size` equal, contiguous
parts (`Dataset.split(equal=True)`); rank r always reads part r from its start. Each epoch reads
the part again in the same order, and a resumed worker skips the batches its checkpoint says it
consumed (`TrainState.data_batches`), so the step after a resume sees the batch it would have seen.

The cost is materialization: the training set sits in the object store (Ray spills it to disk
when it does not fit). data.order: streaming keeps Ray's streaming split for data too large to
hold, such as an uncapped FineWeb stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray.data
import ray.train

if TYPE_CHECKING:
    from ray.data import DataIterator, Dataset

__all__ = ["FixedOrder", "data_config", "fixed_parts", "keep_order"]


def keep_order() -> None:
    """Make the datasets built after this call (in this process) keep their block order, so that
    their materialization is the same on every launch."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True


def fixed_parts(ds: "Dataset", n: int) -> list["Dataset"]:
    """`ds` computed in order, materialized and cut into `n` equal contiguous parts (rows beyond
    the last whole multiple of `n` are dropped, as Ray Train's equal split does)."""
    ds.context.execution_options.preserve_order = True
    return ds.materialize().split(n, equal=True)


class FixedOrder(ray.train.DataConfig):
    """Ray Train's dataset assignment with a fixed order: rank r gets part r of `fixed_parts` of
    every dataset (training and validation)."""

    def configure(self, datasets: dict[str, "Dataset"], world_size: int, worker_handles: Any,
                  worker_node_ids: Any, **kwargs: Any) -> list[dict[str, "DataIterator"]]:
        out: list[dict[str, DataIterator]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for rank, part in enumerate(fixed_parts(ds, world_size)):
                out[rank][name] = part.iterator()
        return out


def data_config(order: str) -> ray.train.DataConfig:
    """The `dataset_config` of the TorchTrainer for data.order."""
    return FixedOrder() if order == "fixed" else ray.train.DataConfig()
