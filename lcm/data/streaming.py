"""Remote mode of the loaders: shards streamed from URLs, read front to back.

Local shards are read by seeking (:mod:`lcm.data.shards`); a URL can only be streamed, so the
remote mode reads whole shards in order through webdataset (:func:`iter_samples`) and shares
everything after that (decoding, transforms, labels, masks) with the local mode
(:meth:`BatchStream.assemble`).

Training, per epoch, on ``R`` ranks with ``W`` loader workers each:

1. the shard order is the local mode's permutation drawn from ``(seed, epoch)``;
2. the ``R * W`` (rank, worker) pairs split the shards: pair ``c = rank * W + worker`` takes
   shards ``c, c + R*W, ...`` of that order (with fewer shards than pairs, pairs share them);
3. each pair streams its shards through a shuffle buffer of ``shuffle_window`` samples
   seeded from ``(seed, epoch, rank, worker)``, reading its shards again from the start if
   they hold fewer samples than its batches need, and dropping what it does not need;
4. every rank yields the local mode's ``total // (R * batch_size)`` batches; worker ``w``
   makes batches ``w, w + W, ...``, so they arrive in order; flips come from
   ``(seed, epoch, rank, batch)`` as in local mode.

So an epoch is a pure function of (seed, epoch, rank, R, W): ``skip_batches=k`` reads past
(without decoding) the batches before ``k`` and resumes exactly when R and W are unchanged.
Unlike local mode, ranks split shards rather than samples, and a sample can be seen twice or
not at all in an epoch when the shards do not divide evenly between the pairs.

Evaluation makes exactly the local mode's batches: worker ``w`` takes a contiguous run of
them (starting at a shard's first whole batch) and streams from the shard its run begins
in, reading past the samples before it. With
several workers the batches arrive interleaved, not in shard order; their contents, and so
every score, are those of the local mode.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from lcm.data.locations import iter_samples
from lcm.data.masks import LabelMask
from lcm.data.plans import EvalPlan, TrainPlan
from lcm.data.shard_format import INFO_FILE, ShardInfo
from lcm.data.stream import BatchStream, Sample
from lcm.errors import DataError

log = logging.getLogger(__name__)

_BUFFER = 4  # first word of the shuffle buffers' seeds (plans.py uses 1-3)

Streamed = tuple[int, str, dict[str, bytes]]  # shard index, key, members by extension


def parse_sample(where: str, key: str, parts: dict[str, bytes]) -> Sample:
    """``(key, jpg, metadata)`` of a streamed sample, or a DataError saying what it lacks."""
    if "jpg" not in parts or "json" not in parts:
        found = ", ".join(sorted(parts)) or "nothing"
        raise DataError(
            f"{where}: sample {key!r} has {found}; lcm shards hold <key>.jpg and <key>.json "
            '({"labels": [...], "ignore": [...]}) per sample'
        )
    try:
        meta = json.loads(parts["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: sample {key!r} has bad metadata ({e})") from e
    return key, parts["jpg"], meta


class _StreamingBase(BatchStream):
    def _shard(self, s: int, skip: int = 0) -> Iterator[Streamed]:
        """The samples of shard ``s`` from ordinal ``skip`` on; the count is checked
        against the info file when the shard is read to its end."""
        seen = 0
        for key, parts in iter_samples(self.paths[s]):
            if seen >= skip:
                yield s, key, parts
            seen += 1
        if seen != self.counts[s]:
            raise DataError(
                f"{self.paths[s]}: holds {seen} samples but {INFO_FILE} lists {self.counts[s]}"
            )

    def _decoded(self, taken: list[Streamed]) -> tuple[list[Sample], np.ndarray]:
        samples = [parse_sample(str(self.paths[s]), key, parts) for s, key, parts in taken]
        return samples, np.asarray([s for s, _, _ in taken], dtype=np.int64)


class StreamingTrainStream(_StreamingBase):
    """Training batches of one rank, streamed (see the module docstring)."""

    def __init__(
        self,
        paths: Sequence[str],
        info: ShardInfo,
        plan: TrainPlan,
        world_size: int,
        shuffle_window: int,
        image_size: int,
        mask: LabelMask | None,
        first: int,
        decode: bool = True,
    ) -> None:
        super().__init__(paths, info, plan, image_size, True, mask, first, decode=decode)
        self.world_size, self.shuffle_window = world_size, shuffle_window

    def batches(self, wid: int, nw: int) -> Iterator[tuple[int, list[Sample], np.ndarray]]:
        plan = self.plan
        assert isinstance(plan, TrainPlan)
        # The DataLoader takes worker 0's batch first, so when resuming at ``first`` worker 0
        # must play the worker whose batches include ``first``: the roles rotate, the
        # batches (and the shards and seed of each role) stay those of the full epoch.
        wid = (wid + self.first) % nw
        pairs = self.world_size * nw
        pair = plan.rank * nw + wid
        order = plan.order.tolist()
        mine = order[pair::pairs]
        if not mine:
            mine = [order[pair % len(order)]]
            log.warning(
                "%d shards for %d (rank, worker) pairs: pair %d re-reads shard %s",
                len(order), pairs, pair, self.paths[mine[0]],
            )  # fmt: skip
        todo = range(wid, plan.num_batches, nw)
        need = len(todo) * plan.batch_size
        rng = np.random.default_rng([_BUFFER, plan.seed, plan.epoch, plan.rank, wid])
        stream = _shuffled(self._cycle(mine, need), min(self.shuffle_window, need), rng)
        for b in todo:
            taken = [next(stream) for _ in range(plan.batch_size)]
            if b < self.first:
                continue  # resuming: read past, decode nothing
            yield b, *self._decoded(taken)

    def _cycle(self, mine: list[int], need: int) -> Iterator[Streamed]:
        """Exactly ``need`` samples: ``mine`` in order, again from the start if needed."""
        given = 0
        while given < need:
            before = given
            for s in mine:
                for item in self._shard(s):
                    yield item
                    given += 1
                    if given == need:
                        return
            if given == before:
                raise DataError(f"{self.paths[mine[0]]}: these shards hold no samples")


def _shuffled(items: Iterator[Streamed], size: int, rng: np.random.Generator) -> Iterator[Streamed]:
    """A shuffle buffer of ``size``: each new item replaces, and sends on, a random one of
    the buffer; the rest leave in random order when ``items`` ends."""
    buf: list[Streamed] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        buf[i], item = item, buf[i]
        yield item
    for i in rng.permutation(len(buf)).tolist():
        yield buf[i]


class StreamingEvalStream(_StreamingBase):
    """Evaluation batches, the local mode's, streamed (see the module docstring)."""

    def batches(self, wid: int, nw: int) -> Iterator[tuple[int, list[Sample], np.ndarray]]:
        plan = self.plan
        assert isinstance(plan, EvalPlan)
        lo, hi = _runs(plan, len(self.paths), nw)[wid]
        if lo >= hi:
            return
        shard, ordinal = plan.locate(plan.positions(lo)[:1])
        stream = self._from(int(shard[0]), int(ordinal[0]))
        for b in range(lo, hi):
            taken = [next(stream) for _ in range(len(plan.positions(b)))]
            yield b, *self._decoded(taken)

    def _from(self, shard: int, skip: int) -> Iterator[Streamed]:
        yield from self._shard(shard, skip)
        for s in range(shard + 1, len(self.paths)):
            yield from self._shard(s)


def _runs(plan: EvalPlan, num_shards: int, nw: int) -> list[tuple[int, int]]:
    """Each worker's contiguous run of batches. With at least as many shards as workers a
    run starts with the first batch that lies wholly in a shard, so a worker streams little
    beyond its own samples; otherwise the batches are split evenly."""
    n = plan.num_batches
    starts = [0]
    if num_shards >= nw:
        for w in range(1, nw):
            first = plan.starts[w * num_shards // nw]  # stream position of the shard's start
            # the first batch wholly inside that shard; the previous worker, streaming on,
            # takes the batch that straddles the boundary
            starts.append(int(np.searchsorted(plan.bounds[:, 0], first, side="left")))
    if num_shards < nw or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        starts = [w * n // nw for w in range(nw)]
    return list(zip(starts, [*starts[1:], n], strict=True))
