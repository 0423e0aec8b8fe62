"""Tokenizing, distributed, exactly resumable batches: pretraining text and chat conversations.

- Slots: a step reads `world_size * grad_accum` micro batches; rank r's micro-step m comes from
  slot r * grad_accum + m, which reads the row groups i with i % num_slots == slot. So one
  process with grad_accum 2 yields exactly the batches of two ranks with grad_accum 1.
- A slot packs one row group (a block) at a time: BOS-aligned best fit, the shortest doc cropped
  when none fits, no padding; leftovers shorter than a row are dropped. So a block is a pure
  function of its row group, and a slot's resume state is a few numbers (epoch, block, row, counters).
- Conversations (midtraining, SFT): the same best fit, whole; padding and non-assistant tokens get target -1.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import chain, islice

import numpy as np
import torch

from nanochat.dataset import list_row_groups, read_row_group

TOKENIZER_THREADS = 4  # tiktoken releases the GIL, so a block tokenizes in parallel

# -------------------------------------------------------------------- Best-fit packing (no parquet, no torch)


def _best_fit(lengths: list[int], row_len: int, crop: bool) -> tuple[list[list[int]], int]:
    """Best-fit item indices per row of `row_len`, and the tokens left over; `crop`: only full rows."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)  # stable: ties keep input order
    sizes = [lengths[i] for i in order]
    left, rows = sum(sizes), []
    while order and (left >= row_len or not crop):  # with crop, left >= space while filling a row
        row, space = [], row_len
        while (j := bisect.bisect_right(sizes, space) - 1) >= 0:
            j = bisect.bisect_left(sizes, sizes[j])  # the earliest item of that length
            space, left = space - sizes[j], left - sizes.pop(j)
            row.append(order.pop(j))
        if crop and space:  # nothing fits: the shortest item is cropped to the space, its tail lost
            left -= sizes.pop(0)
            row.append(order.pop(0))
        rows.append(row)
    return rows, left


def pack_crop(docs: list[list[int]], row_len: int) -> tuple[list[list[int]], int, int]:
    """Best-fit docs into rows of exactly `row_len` tokens: (rows, tokens cropped, tokens dropped)."""
    rows, dropped = _best_fit([len(doc) for doc in docs], row_len, crop=True)
    cropped = sum(len(docs[i]) for row in rows for i in row) - row_len * len(rows)
    # islice stops at the crop: copying a cropped doc whole cost ~10% of the loader's throughput
    rows = [list(islice(chain.from_iterable(docs[i] for i in row), row_len)) for row in rows]
    return rows, cropped, dropped


def pack_pad(items: list[tuple[list[int], list[int]]], row_len: int, pad_id: int):
    """Best-fit (ids, mask) items whole into rows padded with `pad_id` (mask 0): (rows, masks)."""
    assert all(len(ids) <= row_len for ids, _ in items), "truncate items to a row when rendering"
    items = [item for item in items if item[0]]
    placed = _best_fit([len(ids) for ids, _ in items], row_len, crop=False)[0]
    rows = [list(chain.from_iterable(items[i][0] for i in row)) for row in placed]
    masks = [list(chain.from_iterable(items[i][1] for i in row)) for row in placed]
    return [r + [pad_id] * (row_len - len(r)) for r in rows], [m + [0] * (row_len - len(m)) for m in masks]


def batch_from_rows(rows, masks=None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs int32, targets int64), each (B, T), from B rows of T+1 tokens; target -1 where mask is 0."""
    ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))  # (B, T+1)
    inputs = ids[:, :-1].to(torch.int32)  # (B, T)
    targets = ids[:, 1:].clone()  # (B, T); a copy, so masking never writes into the caller's array
    if masks is not None:
        keep = torch.from_numpy(np.asarray(masks, dtype=np.bool_))  # (B, T+1)
        targets[~keep[:, 1:]] = -1  # the mask of token i+1 governs target i
    cuda = torch.device(device).type == "cuda"  # pinned host memory lets the copy run asynchronously
    inputs, targets = (inputs.pin_memory(), targets.pin_memory()) if cuda else (inputs, targets)
    return inputs.to(device, non_blocking=cuda), targets.to(device, non_blocking=cuda)


def _check_resume(saved: dict | None, ours: dict, what: str) -> None:
    """Refuse a resume state saved with another setup: `ours` holds the values that must match."""
    if saved is not None and (theirs := {key: saved[key] for key in ours}) != ours:
        text = lambda values: ", ".join(f"{k}={v!r}" for k, v in values.items())  # noqa: E731
        raise ValueError(f"cannot resume {what}: the saved state has {text(theirs)}, this run {text(ours)}")


def _next_block(state: dict, num_blocks: int) -> None:
    state["block"], state["row"] = (state["block"] + 1) % num_blocks, 0
    state["epoch"] += state["block"] == 0  # past the last block: the next epoch


# ---------------------------------------------------------------------------------------- Pretraining batches


def _load_block(index: int, path, group: int, tokenizer, row_len: int) -> tuple[np.ndarray, dict]:
    """Row group `index` tokenized with BOS, packed into shuffled rows: (rows (n, row_len) int32, counts)."""
    bos = tokenizer.get_bos_token_id()
    docs = tokenizer.encode(read_row_group(path, group), prepend=bos, num_threads=TOKENIZER_THREADS)
    rows, cropped, dropped = pack_crop(docs, row_len)
    rows = np.array(rows, dtype=np.int32).reshape(-1, row_len)
    rows = rows[np.random.default_rng(index).permutation(len(rows))]  # best fit sorts rows by kind
    return rows, {"read": sum(map(len, docs)), "cropped": cropped, "dropped": dropped}


class DataLoader:
    """Endless (inputs (B, T) int32, targets (B, T) int64) micro batches of pretraining text for one rank."""

    def __init__(
        self, tokenizer, B, T, split, rank=0, world_size=1, grad_accum=1, device="cpu", resume_state=None
    ):
        groups = list_row_groups(split)  # a damaged or text-less shard is named here
        if len(groups) < (num_slots := world_size * grad_accum):
            raise ValueError(
                f"the {split} split has {len(groups)} parquet row groups, fewer than ranks x grad_accum = "
                f"{num_slots} (a micro batch each): import more data, or use fewer ranks or micro-steps"
            )
        self.B, self.device = B, torch.device(device)
        same = {"split": split, "T": T, "num_slots": num_slots}  # B may change across a resume
        _check_resume(resume_state, same, "the dataloader")
        self.state = {**same, "row_groups": len(groups), "slots": {}}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nanochat-dataloader")  # prefetches blocks
        self._rows = {}
        for s in range(rank * grad_accum, (rank + 1) * grad_accum):
            # slot s reads the row groups s, s + num_slots, ...; the global index seeds the row shuffle
            own = [(i, *groups[i]) for i in range(s, len(groups), num_slots)]
            state = {"epoch": 1, "block": 0, "row": 0, "batches": 0, "read": 0, "cropped": 0, "dropped": 0}
            state.update(resume_state["slots"][str(s)] if resume_state else {})
            if state["block"] >= len(own):  # the split shrank since the save
                state.update(epoch=state["epoch"] + 1, block=0, row=0)
            self.state["slots"][str(s)] = state
            self._rows[s] = self._slot_rows(state, own, tokenizer, T + 1)

    def _slot_rows(self, state: dict, groups: list, tokenizer, row_len: int) -> Iterator[np.ndarray]:
        """A slot's rows, one at a time, from its state on; `state` follows (block, row, epoch, counts)."""
        counted = state["batches"] > 0  # a resumed slot that already yielded counted its open block
        load = lambda k: self._pool.submit(_load_block, *groups[k], tokenizer, row_len)  # noqa: E731
        future, empty_blocks = load(state["block"]), 0
        while True:
            rows, counts = future.result()
            future = load((state["block"] + 1) % len(groups))  # the next block tokenizes meanwhile
            for name, n in counts.items() if not counted else ():
                state[name] += n
            counted, empty_blocks = False, 0 if len(rows) else empty_blocks + 1
            if empty_blocks > len(groups):
                raise ValueError(f"no document packs into a row of T+1={row_len} tokens: they are too short")
            while state["row"] < len(rows):
                state["row"] += 1
                yield rows[state["row"] - 1]
            _next_block(state, len(groups))

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        # round-robin over this process's slots (fewest batches, then lowest); a batch may span blocks
        s = min(self._rows, key=lambda s: (self.state["slots"][str(s)]["batches"], s))
        rows = np.stack([next(self._rows[s]) for _ in range(self.B)])
        self.state["slots"][str(s)]["batches"] += 1
        return batch_from_rows(rows, device=self.device)

    def state_dict(self) -> dict:
        """This rank's position as a small JSON dict: per slot, the epoch, block, row and counters."""
        return copy.deepcopy(self.state)

    @property
    def epoch(self) -> int:
        """The furthest epoch (from 1) any of this rank's slots has reached."""
        return max(slot["epoch"] for slot in self.state["slots"].values())

    @property
    def cropped_fraction(self) -> float:
        """Tokens cut off cropped docs / tokens read."""
        slots = self.state["slots"].values()
        return sum(slot["cropped"] for slot in slots) / max(1, sum(slot["read"] for slot in slots))


# ----------------------------------------------------------------- Conversation batches (midtraining and SFT)


def conversation_batches(
    task, tokenizer, B: int, T: int, rank=0, world_size=1, device="cpu", resume_state=None, block_size=256
):
    """Infinite (inputs (B, T), targets (B, T), state) micro batches of packed conversations for one rank;
    a yielded `state` as `resume_state` continues right after that batch. `progress`: epochs consumed."""
    n = len(task)
    if n < world_size:
        raise ValueError(f"the task has {n} conversations, fewer than the {world_size} ranks reading it")
    own = range(rank, n, world_size)  # rank r reads conversations r, r + W, ... in blocks of block_size
    num_blocks = -(-len(own) // block_size)
    state = {"epoch": 1, "block": 0, "row": 0}
    _check_resume(resume_state, {"T": T, "examples": n}, "conversation batches")
    state.update({k: resume_state[k] for k in state} if resume_state else {})

    def pack_block(k: int) -> list[tuple[list[int], list[int]]]:
        # rendering truncates to a row, so no conversation is ever cropped across rows
        items = [tokenizer.render_conversation(task[i], T + 1) for i in own[k * block_size :][:block_size]]
        rows, masks = pack_pad(items, T + 1, pad_id=tokenizer.get_bos_token_id())
        order = np.random.default_rng(k * world_size + rank).permutation(len(rows))
        return [(rows[j], masks[j]) for j in order]

    block_rows = pack_block(state["block"])
    while True:
        pairs = []  # B (row, mask) pairs in order, crossing block and epoch boundaries
        while len(pairs) < B:
            if state["row"] >= len(block_rows):  # every block has at least one row
                _next_block(state, num_blocks)
                block_rows = pack_block(state["block"])
            take = block_rows[state["row"] : state["row"] + B - len(pairs)]
            pairs, state["row"] = pairs + take, state["row"] + len(take)
        progress = state["epoch"] - 1 + (state["block"] + state["row"] / len(block_rows)) / num_blocks
        inputs, targets = batch_from_rows(*zip(*pairs, strict=True), device=device)
        yield inputs, targets, {"T": T, "examples": n, **state, "progress": progress}
