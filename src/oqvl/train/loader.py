"""Ready batches for the training loop, made by data-loader worker processes ahead of the step.

Item k of a run segment is micro batch k mod n of step start + k div n on this rank, a pure
function of (seed, step) (oqvl.train.data.step_indices), so workers change when a batch is made,
never what it holds: a resumed run, with or without workers, sees the batches an uninterrupted run
would have. Each worker reads image bytes from the tars (one positioned read each), decodes and
transforms them, and hands over a `Batch` of tensors; with `workers=0` the same code runs in the
training process itself.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader, Dataset

from .data import Batch, rank_micro_batches, step_indices


class StepMicroBatches(Dataset):
    """This rank's micro batches of steps [start, steps), in order."""

    def __init__(self, data, *, seed: int, start: int, steps: int, global_batch: int, rank: int,
                 world: int, micro_batch: int):
        self.data, self.seed, self.start, self.steps = data, seed, start, steps
        self.global_batch, self.rank, self.world, self.micro_batch = global_batch, rank, world, micro_batch
        self.per_step = len(self._micro(start)) if steps > start else 0

    def _micro(self, step: int) -> list:
        indices = step_indices(self.seed, step, self.global_batch, len(self.data))
        return rank_micro_batches(indices, self.rank, self.world, self.micro_batch)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.per_step

    def __getitem__(self, k: int) -> Batch:
        step, i = divmod(k, self.per_step)
        return self.data.batch(self._micro(self.start + step)[i])


def step_batches(data, *, seed: int, start: int, steps: int, global_batch: int, rank: int, world: int,
                 micro_batch: int, workers: int = 0, prefetch: int = 2,
                 pin_memory: bool = False) -> Iterator[list[Batch]]:
    """Per step from `start`, the list of this rank's micro batches."""
    items = StepMicroBatches(data, seed=seed, start=start, steps=steps, global_batch=global_batch,
                             rank=rank, world=world, micro_batch=micro_batch)
    if len(items) == 0:
        return iter(())
    loader = DataLoader(items, batch_size=None, shuffle=False, num_workers=workers,
                        prefetch_factor=prefetch if workers else None, pin_memory=pin_memory,
                        persistent_workers=False, collate_fn=_as_is)
    return _group(iter(loader), items.per_step)


def _as_is(batch: Batch) -> Batch:
    return batch


def _group(it, n: int) -> Iterator[list[Batch]]:
    while True:
        group = []
        for _ in range(n):
            try:
                group.append(next(it))
            except StopIteration:
                if group:
                    raise RuntimeError(f"a step's micro batches ended after {len(group)} of {n}") from None
                return
        yield group

