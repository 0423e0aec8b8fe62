"""Tokenizing, distributed, exactly resumable loaders: pretraining text and chat conversations.

Design choices:
- Slots: a step reads `world_size * grad_accum` micro batches; rank r's micro-step m comes from
  slot r * grad_accum + m, which reads the row groups i with i % num_slots == slot. So one
  process with grad_accum 2 yields exactly the batches of two ranks with grad_accum 1.
- A slot packs one row group (a block) at a time; leftovers shorter than a row are dropped, so
  a block is a pure function of its row group and the resume state is a few numbers per slot.
- BOS-aligned best fit: a row of T+1 tokens starts with a doc's BOS and takes the largest doc
  that fits; when none fits, the shortest is cropped to fill it. No padding.
- Conversations (midtraining, SFT): the same best fit, never cropping; padding and
  non-assistant tokens get target -1.
- Rows of a block are shuffled with a seed from the block's index (best fit orders them by kind).
- A background thread prefetches each slot's next block; tensors are pinned on CUDA.
- A missing, unreadable or `text`-less shard is a DataError naming the file, found before the first
  batch (footers and schemas only).
"""

from __future__ import annotations

import bisect
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat.common import UserError
from nanochat.dataset import get_data_dir, list_parquet_files, list_row_groups

logger = logging.getLogger("nanochat.dataloader")

TOKENIZER_THREADS = 4  # tiktoken releases the GIL, so a block tokenizes in parallel
LOG_EVERY_BLOCKS = 100  # rank 0 logs the crop statistics every this many blocks it opens

# -----------------------------------------------------------------------------
# Best-fit packing (no parquet, no torch)


def _by_length(lengths: list[int]) -> tuple[list[int], list[int]]:
    """Item indices sorted by length (stable: ties keep input order), and those lengths."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return order, [lengths[i] for i in order]


def _take_best_fit(order: list[int], lens: list[int], space: int) -> int | None:
    """Remove and return the largest item of length <= space (the earliest among equals), or None."""
    j = bisect.bisect_right(lens, space) - 1
    if j < 0:
        return None
    j = bisect.bisect_left(lens, lens[j])  # first of the items with that length = earliest in input
    lens.pop(j)
    return order.pop(j)


def pack_crop(docs: list[list[int]], row_len: int) -> tuple[list[list[int]], int, int]:
    """Best-fit docs into rows of `row_len` tokens: (rows, tokens cropped, tokens dropped)."""
    order, lens = _by_length([len(doc) for doc in docs])
    left = sum(lens)  # invariant while filling a row: left >= space, so the loop always ends
    rows, cropped = [], 0
    while left >= row_len:
        row: list[int] = []
        space = row_len
        while space:
            i = _take_best_fit(order, lens, space)
            if i is None:  # nothing fits: crop the shortest doc to the space left, lose its tail
                i, n = order.pop(0), lens.pop(0)
                row += docs[i][:space]
                cropped += n - space
                left -= n
                break
            row += docs[i]
            space -= len(docs[i])
            left -= len(docs[i])
        rows.append(row)
    return rows, cropped, left  # what is left is shorter than a row: dropped


def pack_pad(items: list[tuple[list[int], list[int]]], row_len: int, pad_id: int):
    """Best-fit (ids, mask) items whole into rows padded with `pad_id` (mask 0): (rows, masks)."""
    assert all(len(ids) <= row_len for ids, _ in items), "truncate items to a row when rendering"
    items = [item for item in items if item[0]]
    order, lens = _by_length([len(ids) for ids, _ in items])
    rows, masks = [], []
    while order:
        row: list[int] = []
        row_mask: list[int] = []
        while (i := _take_best_fit(order, lens, row_len - len(row))) is not None:
            row += items[i][0]
            row_mask += items[i][1]
        pad = row_len - len(row)
        rows.append(row + [pad_id] * pad)
        masks.append(row_mask + [0] * pad)
    return rows, masks


def batch_from_rows(
    rows, masks=None, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs int32, targets int64), each (B, T), from B rows of T+1 tokens; target -1 where mask is 0."""
    ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))  # (B, T+1)
    inputs = ids[:, :-1].to(torch.int32)  # (B, T)
    targets = ids[:, 1:].clone()  # (B, T); a copy, so masking never writes into the caller's array
    if masks is not None:
        keep = torch.from_numpy(np.asarray(masks, dtype=np.bool_))  # (B, T+1)
        targets[~keep[:, 1:]] = -1  # the mask of token i+1 governs target i
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:  # pinned host memory lets the copy run asynchronously
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    return inputs.to(device, non_blocking=cuda), targets.to(device, non_blocking=cuda)


def _next_block(state: dict, num_blocks: int) -> bool:
    """Move `state` to the first row of its next block; True when that wraps into a new epoch."""
    state["block"], state["row"] = (state["block"] + 1) % num_blocks, 0
    if state["block"] == 0:
        state["epoch"] += 1
    return state["block"] == 0


# -----------------------------------------------------------------------------
# The pretraining loader


class DataError(UserError, ValueError):
    """A pretraining shard is missing, unreadable or has no `text` column; the message names it."""


READ_ERRORS = (pa.ArrowException, OSError, KeyError)  # what pyarrow raises on a damaged file


def _damaged(path: os.PathLike, e: Exception) -> DataError:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return DataError(
        f"{path} is not a readable parquet shard ({why}): delete it and re-run the command that filled "
        "that folder (python -m nanochat.dataset ...)"
    )


def text_row_groups(split: str, data_dir: str | os.PathLike | None = None) -> list[tuple[os.PathLike, int]]:
    """`list_row_groups`, after checking that every shard of the split opens and has a `text` column."""
    try:
        groups = list_row_groups(split, data_dir)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    except READ_ERRORS as e:  # pyarrow's message does not name the file: find it
        for path in list_parquet_files(data_dir):
            try:
                pq.read_schema(path)
            except READ_ERRORS as e_path:
                raise _damaged(path, e_path) from None
        raise _damaged(get_data_dir(data_dir), e) from None
    for path in dict.fromkeys(path for path, _ in groups):
        columns = pq.read_schema(path).names
        if "text" not in columns:
            raise DataError(
                f"{path} has no 'text' column (columns: {', '.join(columns) or 'none'}): "
                "a pretraining shard holds one document per row in 'text'"
            )
    return groups


def _load_block(path: os.PathLike, group: int, seed: int, tokenizer, row_len: int) -> tuple[np.ndarray, dict]:
    """Read one row group, tokenize it with BOS, best-fit it into rows, shuffle the rows:
    (rows (n, row_len) int32, the tokens read, cropped and dropped)."""
    try:
        with pq.ParquetFile(path) as pf:
            texts = pf.read_row_group(group, columns=["text"]).column("text").to_pylist()
    except READ_ERRORS as e:
        raise _damaged(path, e) from None
    docs = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id(), num_threads=TOKENIZER_THREADS)
    rows, cropped, dropped = pack_crop(docs, row_len)
    rows = np.array(rows, dtype=np.int32).reshape(-1, row_len)
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    return rows, {"read": sum(map(len, docs)), "cropped": cropped, "dropped": dropped}


class DataLoader:
    """Infinite iterator of (inputs (B, T) int32, targets (B, T) int64) micro batches for one rank."""

    def __init__(
        self,
        tokenizer,
        B: int,
        T: int,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        device: str | torch.device = "cpu",
        resume_state: dict | None = None,
        data_dir: str | os.PathLike | None = None,
    ):
        self.B, self.T, self.split, self.rank = B, T, split, rank
        self.device = torch.device(device)
        self.num_slots = world_size * grad_accum
        self._tokenizer = tokenizer
        groups = text_row_groups(split, data_dir)
        if len(groups) < self.num_slots:
            raise ValueError(
                f"the {split} split has {len(groups)} parquet row groups, fewer than ranks x grad_accum = "
                f"{world_size} x {grad_accum} = {self.num_slots}; every micro batch of a step reads its own "
                "row groups, so import more data, or lower the batch (fewer ranks, a smaller total batch "
                "or a larger device batch, i.e. less gradient accumulation)"
            )
        self._num_row_groups = len(groups)
        self._own = list(range(rank * grad_accum, (rank + 1) * grad_accum))
        # slot s reads global row groups s, s + num_slots, ...; the global index seeds the row shuffle
        self._groups = {
            s: [(i, *groups[i]) for i in range(s, len(groups), self.num_slots)] for s in self._own
        }
        fresh = {"epoch": 1, "block": 0, "row": 0, "batches": 0, "read": 0, "cropped": 0, "dropped": 0}
        self._state = {s: dict(fresh) for s in self._own}
        if resume_state is not None:
            self._resume(resume_state)
        self._rows: dict[int, np.ndarray | None] = dict.fromkeys(self._own)  # open blocks, (n, T+1)
        # a resumed slot that already yielded has its current block in the saved counters
        self._counted = {s: self._state[s]["batches"] > 0 for s in self._own}
        self._empty_run = dict.fromkeys(self._own, 0)  # consecutive blocks that packed into no row
        self._blocks_opened = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanochat-dataloader")
        self._pending: dict[int, tuple[int, Future]] = {}
        for s in self._own:
            self._prefetch(s, self._state[s]["block"])

    def _resume(self, saved: dict) -> None:
        ours = {"split": self.split, "T": self.T, "num_slots": self.num_slots}
        theirs = {key: saved[key] for key in ours}
        if theirs != ours:
            raise ValueError(
                f"cannot resume: the saved dataloader state has {theirs}, this run {ours} "
                "(B may change across a resume; split, T and ranks x grad_accum may not)"
            )
        if saved["row_groups"] != self._num_row_groups:
            logger.warning(
                f"the {self.split} split had {saved['row_groups']} row groups at the save and has "
                f"{self._num_row_groups} now: resuming, but not at exactly the same data"
            )
        for s in self._own:
            state = self._state[s]
            state.update(saved["slots"][str(s)])
            if state["block"] >= len(self._groups[s]):  # the split shrank since the save
                state.update(epoch=state["epoch"] + 1, block=0, row=0)

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        # round-robin over this process's slots: the one with the fewest batches (ties: lowest)
        s = min(self._own, key=lambda slot: (self._state[slot]["batches"], slot))
        state, parts, n = self._state[s], [], self.B
        while n > 0:  # rows are the unit: a batch may span blocks (and epochs)
            rows = self._current_rows(s)
            k = min(n, len(rows) - state["row"])
            if k <= 0:
                self._advance(s)
                continue
            parts.append(rows[state["row"] : state["row"] + k])
            state["row"] += k
            n -= k
        state["batches"] += 1
        return batch_from_rows(np.concatenate(parts), device=self.device)

    def _current_rows(self, s: int) -> np.ndarray:
        if self._rows[s] is not None:
            return self._rows[s]
        state = self._state[s]
        k, future = self._pending.pop(s)
        assert k == state["block"]
        rows, counts = future.result()
        self._rows[s] = rows
        self._prefetch(s, (k + 1) % len(self._groups[s]))
        if not self._counted[s]:
            for name, n in counts.items():
                state[name] += n
            self._counted[s] = True
        self._empty_run[s] = 0 if len(rows) else self._empty_run[s] + 1
        if self._empty_run[s] > len(self._groups[s]):
            raise ValueError(
                f"slot {s} of the {self.split} split packs into no row of T+1={self.T + 1} tokens: "
                "its documents are too short for this sequence length"
            )
        self._blocks_opened += 1
        if self.rank == 0 and self._blocks_opened % LOG_EVERY_BLOCKS == 0:
            logger.info(
                f"dataloader {self.split}: {self._blocks_opened} blocks opened, {self.cropped_fraction:.1%} "
                f"of tokens cropped, {self.dropped_fraction:.2%} dropped at block ends"
            )
        return rows

    def _advance(self, s: int) -> None:
        state = self._state[s]
        if _next_block(state, len(self._groups[s])) and self.rank == 0:
            logger.info("dataloader %s: slot %d starts epoch %d", self.split, s, state["epoch"])
        self._rows[s] = None
        self._counted[s] = False

    def _prefetch(self, s: int, k: int) -> None:
        index, path, group = self._groups[s][k]
        future = self._pool.submit(_load_block, path, group, index, self._tokenizer, self.T + 1)
        self._pending[s] = (k, future)

    def state_dict(self) -> dict:
        """This rank's position as a small JSON dict: per slot, the epoch, block, row and counters."""
        slots = {str(s): dict(self._state[s]) for s in self._own}
        return {
            "split": self.split,
            "T": self.T,
            "num_slots": self.num_slots,
            "row_groups": self._num_row_groups,
            "slots": slots,
        }

    def _total(self, name: str) -> int:
        return sum(self._state[s][name] for s in self._own)

    @property
    def epoch(self) -> int:
        """The furthest epoch (from 1) any of this rank's slots has reached."""
        return max(self._state[s]["epoch"] for s in self._own)

    @property
    def cropped_fraction(self) -> float:
        """Tokens cut off cropped docs / tokens read."""
        return self._total("cropped") / max(1, self._total("read"))

    @property
    def dropped_fraction(self) -> float:
        """Tokens left over at block ends (never in a row) / tokens read."""
        return self._total("dropped") / max(1, self._total("read"))


# -----------------------------------------------------------------------------
# Conversation batches (midtraining and SFT)


def conversation_batches(
    task,
    tokenizer,
    B: int,
    T: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    resume_state: dict | None = None,
    block_size: int = 256,
):
    """Infinite (inputs (B, T), targets (B, T), state) micro batches of packed conversations for one rank.

    Pass a yielded `state` as `resume_state` to continue right after that batch; its `progress`
    counts the epochs consumed (fractional).
    """
    n = len(task)
    if n < world_size:
        raise ValueError(f"the task has {n} conversations, fewer than the {world_size} ranks reading it")
    own = range(rank, n, world_size)  # rank r reads conversations r, r + W, ... in blocks of block_size
    num_blocks = -(-len(own) // block_size)
    state = {"epoch": 1, "block": 0, "row": 0}
    if resume_state is not None:
        for key, ours in (("T", T), ("examples", n)):
            if resume_state[key] != ours:
                raise ValueError(
                    f"cannot resume conversation batches: the saved state has {key}={resume_state[key]!r}, "
                    f"this run has {ours!r}"
                )
        state.update({k: resume_state[k] for k in state})
    pad_id = tokenizer.get_bos_token_id()

    def pack_block(k: int) -> list[tuple[list[int], list[int]]]:
        # rendering truncates to a row, so no conversation is ever cropped across rows
        items = [
            tokenizer.render_conversation(task[i], max_tokens=T + 1)
            for i in own[k * block_size :][:block_size]
        ]
        rows, masks = pack_pad(items, T + 1, pad_id)
        order = np.random.default_rng(k * world_size + rank).permutation(len(rows))
        return [(rows[j], masks[j]) for j in order]

    block_rows = pack_block(state["block"])
    while True:
        rows, masks = [], []
        while len(rows) < B:  # B rows in order, crossing block and epoch boundaries
            if state["row"] >= len(block_rows):  # every block has at least one row
                _next_block(state, num_blocks)
                block_rows = pack_block(state["block"])
            take = block_rows[state["row"] : state["row"] + B - len(rows)]
            rows += [r for r, _ in take]
            masks += [m for _, m in take]
            state["row"] += len(take)
        progress = state["epoch"] - 1 + (state["block"] + state["row"] / len(block_rows)) / num_blocks
        inputs, targets = batch_from_rows(rows, masks, device)
        yield inputs, targets, {"T": T, "examples": n, **state, "progress": progress}
