"""Tokenizing, distributed, exactly resumable pretraining loader, and the best-fit row packer.

    loader = DataLoader(tokenizer, B, T, "train", rank, world_size, grad_accum, device)
    inputs, targets = next(loader)         # (B, T) int32, (B, T) int64, on `device`
    meta["dataloader"] = loader.state_dict()   # small JSON dict (gather it across ranks, below)

Design choices:
- Data-parallel slots. One optimizer step reads `num_slots = world_size * grad_accum` micro
  batches; micro batch `micro_step` of rank `rank` comes from slot `rank * grad_accum +
  micro_step`. Slot s is an independent stream over the row groups whose global index i has
  i % num_slots == s (so ranks read disjoint row groups), which it tokenizes and packs by
  itself. A process yields from its own slots round-robin. Hence one process with
  grad_accum 2 yields exactly the micro batches of two ranks with grad_accum 1, and a
  state saved under one layout resumes under any other with the same num_slots.
- Blocks. A slot packs one row group (one block) at a time, using only that block's docs as
  the best-fit buffer (1024 docs for FineWeb-Edu). The tokens left at the end of a block
  that cannot fill a whole row (fewer than T+1) are dropped, not carried into the next
  block, and counted (`dropped_fraction`; at most T tokens per block, ~0.2% of a FineWeb
  row group at T=2048). Dropping keeps every block a pure function of its row group, so
  the resume state is three numbers per slot and a resume re-reads one row group.
- The rows of a block are shuffled with a seed equal to the row group's global index
  (deterministic): best fit makes rows of whole short docs first and crops of long docs
  last, and without the shuffle consecutive batches would drift between the two kinds.
- BOS-aligned best fit ("crop" mode). Docs are tokenized with BOS prepended; a row holds
  T+1 tokens (inputs row[:-1], targets row[1:]) and starts with a doc's BOS. A row is filled
  by repeatedly taking the largest remaining doc that fits the space left (ties: the
  earlier doc of the block); when no doc fits, the shortest doc (ties: the earlier) is
  cropped to exactly fill the rest and its tail is discarded (`cropped_fraction` = cropped
  tokens / tokens read). No padding. Docs longer than a row are only ever used cropped,
  so short contexts on long-doc corpora crop a lot (offline corpus, 1024-token vocab, T=256: ~94%).
- "pad" mode (mid-training / SFT): the same best fit over (ids, mask) items, never
  cropping; the rest of a row is padding (`pad_id` as input) whose targets are -1, and
  targets whose token has mask 0 are -1 too (mask[i+1] governs target i). An item longer
  than a row is an error (callers truncate when rendering). `pack_rows` + `batch_from_rows`
  work on plain lists, without parquet.
- Epochs: a slot that has read its last row group starts again at its first (same order:
  the shards are already shuffled); epochs count from 1 and each new epoch is logged by
  rank 0. Every slot needs a row group: fewer row groups than ranks x grad_accum is a
  ValueError at construction. A slot whose whole split packs into zero rows is an error
  too (the docs are shorter than one row in total).
- Resume state (JSON): {"version", "split", "T", "num_slots", "row_groups", "slots": {"<s>":
  {"epoch", "block", "row", "batches", "read", "cropped", "dropped"}}}: per slot, the
  epoch, the block (k-th row group of the slot), rows already taken from it, batches
  yielded, and token counters. A resumed slot re-reads and re-packs its current block and
  skips the rows taken. B may change across a resume (rows are the unit); T, split and
  num_slots may not. `state_dict()` holds only this process's slots and does not
  communicate; under torchrun gather the ranks' states before rank 0 writes the meta:
      states = [None] * world_size; dist.all_gather_object(states, loader.state_dict())
      meta["dataloader"] = merge_states(states)
  Every rank then resumes from the merged dict, taking its own slots.
- Speed: a background thread reads, tokenizes (tiktoken, `tokenizer_threads` threads, GIL
  released) and packs each slot's next block while the current one is consumed. A block is
  a pure function of its index, so prefetch timing never changes a batch. Construction
  reads parquet footers only (cheap enough to make a fresh validation loader per eval).
- Tensors are built on CPU; on CUDA they are pinned and copied with non_blocking=True.
- The tokenizer is anything with `encode(list_of_texts, prepend=id, num_threads=n)` and
  `get_bos_token_id()`.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch

from nanochat.dataset import list_row_groups

logger = logging.getLogger("nanochat.dataloader")

STATE_VERSION = 1
LOG_EVERY_BLOCKS = 100  # rank 0 logs the crop statistics every this many blocks it opens
COUNTERS = ("read", "cropped", "dropped")

# -----------------------------------------------------------------------------
# Best-fit packing (no parquet, no torch)


class Packed(NamedTuple):
    """Rows of exactly row_len tokens, and what did not make it into them."""

    rows: list[list[int]]
    masks: list[list[int]] | None  # pad mode: 1 = train on this token, 0 = mask or padding
    cropped: int  # crop mode: tokens cut off the ends of cropped docs
    dropped: int  # crop mode: tokens of the docs left over (together shorter than a row)
    padded: int  # pad mode: padding tokens


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


def pack_rows(items: Sequence, row_len: int, mode: str = "crop", pad_id: int = 0) -> Packed:
    """Best-fit `items` into rows of `row_len` tokens.

    crop mode: items are token lists (each starting with BOS); rows are made while the items
    left hold at least row_len tokens, cropping the shortest item when none fits; the rest is
    dropped. pad mode: items are (ids, mask) pairs no longer than row_len; all are placed
    whole and each row is completed with `pad_id` (mask 0).
    """
    if row_len < 2:
        raise ValueError(f"row_len must be at least 2 (one input and one target), got {row_len}")
    if mode == "crop":
        return _pack_crop([list(doc) for doc in items], row_len)
    if mode == "pad":
        return _pack_pad(items, row_len, pad_id)
    raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")


def _pack_crop(docs: list[list[int]], row_len: int) -> Packed:
    order, lens = _by_length([len(doc) for doc in docs])
    left = sum(lens)  # invariant while filling a row: left >= space, so the loop always ends
    rows, cropped = [], 0
    while left >= row_len:
        row: list[int] = []
        space = row_len
        while space:
            i = _take_best_fit(order, lens, space)
            if i is None:  # nothing fits: crop the shortest doc to the space left
                i, n = order.pop(0), lens.pop(0)
                row += docs[i][:space]
                cropped += n - space
                left -= n
                break
            row += docs[i]
            space -= len(docs[i])
            left -= len(docs[i])
        rows.append(row)
    return Packed(rows, None, cropped, left, 0)


def _pack_pad(items: Sequence, row_len: int, pad_id: int) -> Packed:
    pairs = []
    for k, (ids, mask) in enumerate(items):
        if len(ids) != len(mask):
            raise ValueError(f"item {k}: {len(ids)} ids but {len(mask)} mask values")
        if len(ids) > row_len:
            raise ValueError(
                f"item {k} has {len(ids)} tokens, more than a row of {row_len}; pad mode never crops, "
                "so truncate conversations when rendering them"
            )
        if ids:
            pairs.append((list(ids), list(mask)))
    order, lens = _by_length([len(ids) for ids, _ in pairs])
    rows, masks, padded = [], [], 0
    while order:
        row: list[int] = []
        row_mask: list[int] = []
        while (i := _take_best_fit(order, lens, row_len - len(row))) is not None:
            row += pairs[i][0]
            row_mask += pairs[i][1]
        pad = row_len - len(row)
        rows.append(row + [pad_id] * pad)
        masks.append(row_mask + [0] * pad)
        padded += pad
    return Packed(rows, masks, 0, 0, padded)


def batch_from_rows(
    rows, masks=None, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T), from B rows of T+1 tokens.

    inputs = row[:-1] as int32, targets = row[1:] as int64, set to -1 where the mask of the
    target token is 0. Built on CPU; pinned and copied asynchronously to a CUDA device.
    """
    ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))  # (B, T+1)
    if ids.ndim != 2 or ids.size(1) < 2:
        raise ValueError(f"rows must be (B, T+1) with T >= 1, got shape {tuple(ids.shape)}")
    inputs = ids[:, :-1].to(torch.int32)  # (B, T)
    targets = ids[:, 1:].clone()  # (B, T); a copy, so masking never writes into the caller's array
    if masks is not None:
        keep = torch.from_numpy(np.asarray(masks, dtype=np.bool_))
        if keep.shape != ids.shape:
            raise ValueError(f"masks shape {tuple(keep.shape)} differs from rows shape {tuple(ids.shape)}")
        targets[~keep[:, 1:]] = -1
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:  # pinned host memory lets the copy run asynchronously
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    return inputs.to(device, non_blocking=cuda), targets.to(device, non_blocking=cuda)


# -----------------------------------------------------------------------------
# The pretraining loader


class _Block(NamedTuple):
    rows: np.ndarray  # (n, T+1) int32, shuffled
    read: int
    cropped: int
    dropped: int


def _load_block(path: os.PathLike, group: int, seed: int, tokenizer, threads: int, row_len: int) -> _Block:
    """Read one row group, tokenize it with BOS, best-fit it into rows, shuffle the rows."""
    with pq.ParquetFile(path) as pf:
        texts = pf.read_row_group(group, columns=["text"]).column("text").to_pylist()
    docs = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id(), num_threads=threads)
    packed = _pack_crop(docs, row_len)
    rows = np.array(packed.rows, dtype=np.int32).reshape(-1, row_len)
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    return _Block(rows, sum(map(len, docs)), packed.cropped, packed.dropped)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def merge_states(states: Sequence[dict]) -> dict:
    """One state from the per-rank `state_dict()`s of a run (what rank 0 saves)."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    merged = {k: v for k, v in states[0].items() if k != "slots"}
    merged["slots"] = {}
    for state in states:
        for key in ("version", "split", "T", "num_slots"):
            if state[key] != merged[key]:
                raise ValueError(f"dataloader states disagree on {key}: {state[key]!r} vs {merged[key]!r}")
        merged["slots"].update(state["slots"])
    return merged


class DataLoader:
    """Infinite iterator of (inputs, targets) micro batches for one rank; see the module docstring."""

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
        tokenizer_threads: int = 4,
    ):
        _check_positive(
            B=B, T=T, world_size=world_size, grad_accum=grad_accum, tokenizer_threads=tokenizer_threads
        )
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        self.B, self.T, self.split, self.rank = B, T, split, rank
        self.device = torch.device(device)
        self.num_slots = world_size * grad_accum
        self._tokenizer, self._threads = tokenizer, tokenizer_threads
        groups = list_row_groups(split, data_dir)
        if len(groups) < self.num_slots:
            raise ValueError(
                f"the {split} split has {len(groups)} parquet row groups, fewer than ranks x grad_accum = "
                f"{world_size} x {grad_accum} = {self.num_slots}; every micro batch of a step reads its own "
                "row groups, so import more data, or lower the batch (fewer ranks, a smaller total batch "
                "or a larger device batch, i.e. less gradient accumulation)"
            )
        self._num_row_groups = len(groups)
        self._own = list(range(rank * grad_accum, (rank + 1) * grad_accum))
        # slot s reads global row groups s, s + num_slots, s + 2 num_slots, ...
        self._groups = {
            s: [(i, *groups[i]) for i in range(s, len(groups), self.num_slots)] for s in self._own
        }
        self._state = {s: self._initial_slot_state(s, resume_state) for s in self._own}
        if resume_state is not None and resume_state.get("row_groups") != len(groups):
            logger.warning(
                "the %s split had %s row groups when the dataloader state was saved and has %d now; "
                "resuming, but not at exactly the same data",
                split,
                resume_state.get("row_groups"),
                len(groups),
            )
        self._block: dict[int, _Block | None] = dict.fromkeys(self._own)
        # a resumed slot that already yielded has its current block in the saved counters
        self._counted = {s: self._state[s]["batches"] > 0 for s in self._own}
        self._empty_run = dict.fromkeys(self._own, 0)  # consecutive blocks that packed into no row
        self._blocks_opened = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanochat-dataloader")
        self._pending: dict[int, tuple[int, Future]] = {}
        for s in self._own:
            self._prefetch(s, self._state[s]["block"])

    def _initial_slot_state(self, s: int, resume_state: dict | None) -> dict:
        fresh = {"epoch": 1, "block": 0, "row": 0, "batches": 0, "read": 0, "cropped": 0, "dropped": 0}
        if resume_state is None:
            return fresh
        if resume_state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown dataloader state version {resume_state.get('version')!r}")
        for key, ours in (("split", self.split), ("T", self.T), ("num_slots", self.num_slots)):
            if resume_state[key] != ours:
                raise ValueError(
                    f"cannot resume: the saved dataloader state has {key}={resume_state[key]!r}, "
                    f"this run has {ours!r} (B may change across a resume; split, T and "
                    "ranks x grad_accum may not)"
                )
        if str(s) not in resume_state["slots"]:
            raise ValueError(
                f"the saved dataloader state has no slot {s} (it holds slots "
                f"{sorted(resume_state['slots'], key=int)}); under torchrun save "
                "merge_states() of all ranks' states"
            )
        state = {**fresh, **{k: int(v) for k, v in resume_state["slots"][str(s)].items()}}
        if state["block"] >= len(self._groups[s]):  # the split shrank since the save
            state.update(epoch=state["epoch"] + 1, block=0, row=0)
        return state

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        # round-robin over this process's slots: the one with the fewest batches (ties: lowest)
        s = min(self._own, key=lambda slot: (self._state[slot]["batches"], slot))
        rows = self._take_rows(s, self.B)
        self._state[s]["batches"] += 1
        return batch_from_rows(rows, device=self.device)

    def _take_rows(self, s: int, n: int) -> np.ndarray:
        state, parts = self._state[s], []
        while n > 0:
            rows = self._current_block(s).rows
            k = min(n, len(rows) - state["row"])
            if k <= 0:
                self._advance(s)
                continue
            parts.append(rows[state["row"] : state["row"] + k])
            state["row"] += k
            n -= k
        return np.concatenate(parts) if len(parts) > 1 else parts[0]  # (n, T+1)

    def _current_block(self, s: int) -> _Block:
        if self._block[s] is not None:
            return self._block[s]
        state = self._state[s]
        k = state["block"]
        key, future = self._pending.pop(s, (None, None))
        block = future.result() if key == k else self._load(s, k)
        self._block[s] = block
        if not self._counted[s]:
            for name in COUNTERS:
                state[name] += getattr(block, name)
            self._counted[s] = True
        self._empty_run[s] = 0 if len(block.rows) else self._empty_run[s] + 1
        if self._empty_run[s] > len(self._groups[s]):
            raise ValueError(
                f"slot {s} of the {self.split} split packs into no row of T+1={self.T + 1} tokens: "
                "its documents are too short for this sequence length"
            )
        nxt = (k + 1) % len(self._groups[s])
        if nxt != k:
            self._prefetch(s, nxt)
        else:
            self._pending[s] = (k, _done(block))  # a slot with one row group reuses it
        self._blocks_opened += 1
        if self.rank == 0 and self._blocks_opened % LOG_EVERY_BLOCKS == 0:
            logger.info(
                "dataloader %s: %d blocks opened, %.1f%% of tokens cropped, %.2f%% dropped at block ends",
                self.split,
                self._blocks_opened,
                100 * self.cropped_fraction,
                100 * self.dropped_fraction,
            )
        return block

    def _advance(self, s: int) -> None:
        state = self._state[s]
        state["block"] += 1
        state["row"] = 0
        if state["block"] == len(self._groups[s]):
            state["block"] = 0
            state["epoch"] += 1
            if self.rank == 0:
                logger.info("dataloader %s: slot %d starts epoch %d", self.split, s, state["epoch"])
        self._block[s] = None
        self._counted[s] = False

    def _block_args(self, s: int, k: int) -> tuple:
        index, path, group = self._groups[s][k]  # the row group's global index seeds the row shuffle
        return path, group, index, self._tokenizer, self._threads, self.T + 1

    def _load(self, s: int, k: int) -> _Block:
        return _load_block(*self._block_args(s, k))

    def _prefetch(self, s: int, k: int) -> None:
        self._pending[s] = (k, self._pool.submit(_load_block, *self._block_args(s, k)))

    # ------------------------------------------------------------------ state and statistics

    def state_dict(self) -> dict:
        """This process's position as a small JSON-serializable dict (merge ranks with merge_states)."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "T": self.T,
            "num_slots": self.num_slots,
            "row_groups": self._num_row_groups,
            "slots": {str(s): dict(self._state[s]) for s in self._own},
        }

    def _total(self, name: str) -> int:
        return sum(self._state[s][name] for s in self._own)

    @property
    def epoch(self) -> int:
        """The furthest epoch (from 1) any of this process's slots has reached."""
        return max(self._state[s]["epoch"] for s in self._own)

    @property
    def cropped_fraction(self) -> float:
        """Tokens cut off cropped docs / tokens read, over this process's slots."""
        return self._total("cropped") / max(1, self._total("read"))

    @property
    def dropped_fraction(self) -> float:
        """Tokens left over at block ends (never in a row) / tokens read."""
        return self._total("dropped") / max(1, self._total("read"))

    def close(self) -> None:
        """Stop the prefetch thread (it also stops when the loader is garbage collected)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


# -----------------------------------------------------------------------------
# Conversation batches (midtraining and SFT)
#
# One function serves mid_train and chat_sft. Conversations are rendered with
# `render_conversation(conv, max_tokens=T+1)` (truncated, never dropped) and best-fit into rows of
# T+1 tokens in pad mode (`pack_rows`), so no conversation is ever cropped across rows and padding
# and non-assistant tokens have target -1. Rank r reads the conversations r, r+W, r+2W, ... of
# the task (W = world size) in blocks of `block_size`; each block is packed on its own and its
# rows are shuffled with the block's global index as the seed (best fit puts long conversations
# first). Micro batches take B rows in order, crossing block and epoch boundaries, so the
# position is three numbers: epoch, block, row. The generator is infinite over epochs; the
# state yielded with each batch says where the stream stands after it, including `progress`
# (epochs consumed, fractional), which callers use to stop after one epoch and to schedule
# the LR. Resuming from a yielded state re-renders that block and yields exactly the batches
# that would have followed.

CONVERSATION_STATE_VERSION = 1


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
    """Infinite (inputs, targets, state) micro batches of packed conversations for one rank.

    inputs (B, T) int32 and targets (B, T) int64 (-1 where not supervised) are on `device`;
    `state` is a JSON-able dict: pass it as `resume_state` to continue right after that batch.
    """
    _check_positive(B=B, T=T, world_size=world_size, block_size=block_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
    n = len(task)
    if n < world_size:
        raise ValueError(f"the task has {n} conversations, fewer than the {world_size} ranks reading it")
    own = range(rank, n, world_size)  # this rank's conversations (indices into the task view)
    num_blocks = -(-len(own) // block_size)
    state = {"epoch": 1, "block": 0, "row": 0}
    if resume_state is not None:
        for key, ours in (("version", CONVERSATION_STATE_VERSION), ("T", T), ("examples", n)):
            if resume_state.get(key) != ours:
                raise ValueError(
                    "cannot resume conversation batches: the saved state has "
                    f"{key}={resume_state.get(key)!r}, this run has {ours!r}"
                )
        state.update({k: int(resume_state[k]) for k in ("epoch", "block", "row")})
    pad_id = tokenizer.get_bos_token_id()

    def pack_block(k: int) -> list[list[int]]:
        items = [
            tokenizer.render_conversation(task[i], max_tokens=T + 1)
            for i in own[k * block_size :][:block_size]
        ]
        packed = pack_rows(items, T + 1, mode="pad", pad_id=pad_id)
        order = np.random.default_rng(k * world_size + rank).permutation(len(packed.rows))
        return [(packed.rows[j], packed.masks[j]) for j in order]

    block_rows = pack_block(state["block"])
    while True:
        rows, masks = [], []
        while len(rows) < B:
            if state["row"] >= len(block_rows):  # next block (and epoch); every block has >= 1 row
                state["block"] += 1
                state["row"] = 0
                if state["block"] == num_blocks:
                    state["block"] = 0
                    state["epoch"] += 1
                block_rows = pack_block(state["block"])
            take = block_rows[state["row"] : state["row"] + B - len(rows)]
            rows += [r for r, _ in take]
            masks += [m for _, m in take]
            state["row"] += len(take)
        progress = state["epoch"] - 1 + (state["block"] + state["row"] / len(block_rows)) / num_blocks
        snapshot = {
            "version": CONVERSATION_STATE_VERSION,
            "T": T,
            "examples": n,
            **state,
            "progress": progress,
        }
        inputs, targets = batch_from_rows(rows, masks, device)
        yield inputs, targets, snapshot
