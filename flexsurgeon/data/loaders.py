"""Deterministic DataLoaders: keyed samplers, and each sample's augmentation seeded by its key.

A batch depends only on ``(seed, epoch)`` (and the rank when distributed), whatever
``num_workers`` is, so a loader rebuilt after a resume repeats the uninterrupted run.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate
from torch.utils.data.distributed import DistributedSampler

from ..errors import DataError
from .bundle import skipped
from .seeds import generator, mix, seed_worker, seeded_rngs


def make_loader(dataset, *, batch_size: int, train: bool, seed: int, epoch: int = 0, num_workers: int = 0,
                distributed: bool = False, pin_memory: bool = False, drop_last: bool | None = None,
                num_replicas: int | None = None, rank: int | None = None) -> DataLoader:
    """A DataLoader whose batches depend only on ``(seed, epoch)`` (and the rank when distributed).

    The sample order comes from a generator seeded by ``(seed, epoch)`` (``DistributedSampler``
    with ``seed`` and ``set_epoch(epoch)`` when ``distributed``; ``num_replicas`` / ``rank``
    default to the process group's; a distributed evaluation loader gives each rank every
    ``num_replicas``-th sample, unpadded, so summed metrics count every sample once). Every
    sample's augmentation runs with torch's, Python's and numpy's RNGs seeded from
    ``(seed, epoch, index)`` and restored afterwards, so a batch is the same whatever
    ``num_workers`` is, and a loader rebuilt after a resume repeats the uninterrupted run.
    ``loader.sampler.set_epoch(e)`` moves a loader (and its persistent workers) to epoch
    ``e``. ``drop_last`` defaults to ``train``, but never drops every batch. Iterable
    datasets (streaming timm sets) get a plain loader; their order is the reader's.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    worker_args = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                       worker_init_fn=seed_worker if num_workers > 0 else None,
                       generator=generator(seed, epoch, 0x5EED))
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        return DataLoader(dataset, batch_size=batch_size, drop_last=bool(drop_last), **worker_args)
    if distributed and train:
        sampler = _KeyedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                           drop_last=False)
    elif distributed:
        # Evaluation: each sample on exactly one rank. DistributedSampler would pad the
        # shards to equal length by repeating samples, which the summed metrics count twice.

        world = num_replicas if num_replicas is not None else tdist.get_world_size()
        sampler = _KeyedSampler(len(dataset), shuffle=False, seed=seed,
                                shard=(rank if rank is not None else tdist.get_rank(), world))
    else:
        sampler = _KeyedSampler(len(dataset), shuffle=train, seed=seed)
    sampler.set_epoch(epoch)
    if drop_last is None:
        drop_last = train and len(sampler) >= batch_size
    return _Loader(_SeededView(dataset, seed), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                   collate_fn=functools.partial(_collate, train=train), **worker_args)


def _collate(items: list, train: bool):
    """A batch of the items that are not ``None`` (images that failed to decode); ``None`` when
    none is left. A training batch that lost images keeps an even number, at least 2 (timm's
    mixup and cutmix need an even batch, batch norm two images)."""
    kept = [item for item in items if item is not None]
    if train and len(kept) < len(items):
        kept = kept[:len(kept) - len(kept) % 2]
    return default_collate(kept) if kept else None


class _Loader(DataLoader):
    """A DataLoader that leaves out the batches that lost all their images (see ``_collate``);
    a pass that leaves out every batch is a one-line DataError."""

    def __iter__(self):
        batches, yielded = super().__iter__(), 0
        for batch in batches:
            if batch is not None:
                yielded += 1
                yield batch
        if not yielded and len(self) > 0:
            inner = self.dataset.dataset
            root = getattr(getattr(inner, "dataset", inner), "root", "the data set")  # through a Subset
            raise DataError(f"no readable images under {root}: every batch lost all its images "
                            f"({skipped(inner)} failed to load)")

class _SeededView(Dataset):
    """Reads ``(index, epoch)`` keys from the keyed samplers and seeds each sample's augmentation."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    @property
    def skipped(self) -> int:
        return skipped(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.dataset[key]
        index, epoch = key
        with seeded_rngs(mix(self.seed, epoch, index)):
            return self.dataset[index]


class _KeyedSampler(Sampler):
    """Shuffled (or sequential) indices, as ``(index, epoch)``; the order depends on ``(seed, epoch)`` only.

    ``shard=(rank, world)`` keeps every ``world``-th position of that order from ``rank`` on.
    """

    def __init__(self, length, shuffle, seed, shard: tuple[int, int] = (0, 1)):
        self.length, self.shuffle, self.seed, self.epoch = length, shuffle, seed, 0
        self.rank, self.world = shard

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(range(self.rank, self.length, self.world))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=generator(self.seed, self.epoch))
        else:
            order = torch.arange(self.length)
        return ((i, self.epoch) for i in order[self.rank::self.world].tolist())


class _KeyedDistributedSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(index, epoch)`` keys for :class:`_SeededView`."""

    def __iter__(self):
        epoch = self.epoch
        return ((i, epoch) for i in super().__iter__())
