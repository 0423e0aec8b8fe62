"""nanochat.dataloader: best-fit packing (crop and pad), rank/slot layout, exact resume. On the
session's offline corpus with its tokenizer, and on a synthetic one whose every token names its
document (`IdTokenizer`), so each token of a batch traces back to its document and row group."""

import json
import random
import time

import pytest
import torch

from nanochat.dataloader import DataLoader, batch_from_rows, pack_crop, pack_pad
from nanochat.dataset import list_row_groups, parquets_iter_batched, write_shards

B, T = 4, 64


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(got, expected) -> None:
    for k, ((x, y), (ex, ey)) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(x, ex) and torch.equal(y, ey), f"batch {k} differs"


def saved(dl: DataLoader) -> dict:
    """The loader's state as base_train saves it: through JSON."""
    return json.loads(json.dumps(dl.state_dict()))


def rows_of(batch) -> torch.Tensor:
    """The (B, T+1) token rows a batch was cut from."""
    return torch.cat([batch[0].long(), batch[1][:, -1:]], dim=1)


def loader(tokenizer, **kwargs) -> DataLoader:
    return DataLoader(tokenizer, **{"B": B, "T": T, "split": "train", **kwargs})


# ---------------------------------------------------------------------- The packer, by hand


def doc(token: int, n: int, bos: int = 0) -> list[int]:
    return [bos] + [token] * (n - 1)


def test_best_fit_takes_the_largest_fitting_doc_crops_the_shortest_and_accounts_for_every_token():
    a, b, c, d, e = doc(1, 7), doc(2, 5), doc(3, 3), doc(4, 14), doc(5, 2)
    # row 1: largest fitting is a (7), then c (3) fills the 3 left exactly
    # row 2: b (5), then e (2); 3 left, only d (14) remains: crop it to 3, its 11 other tokens are lost
    assert pack_crop([d, e, a, b, c], row_len=10) == ([a + c, b + e + d[:3]], 11, 0)
    p, q, r = doc(1, 8), doc(2, 8), doc(3, 3)
    # p and q tie: the earlier (p) goes first; 2 left, nothing fits: crop the SHORTEST (r, not q)
    # q alone (8 tokens) cannot make a row: dropped, never seen
    assert pack_crop([p, q, r], row_len=10) == ([p + r[:2]], 1, 8)
    assert pack_crop([doc(1, 4), doc(2, 3)], row_len=10) == ([], 0, 7)
    rng = random.Random(0)
    docs = [doc(i + 1, rng.randint(1, 40)) for i in range(300)]
    rows, cropped, dropped = pack_crop(docs, row_len=33)
    assert rows and all(len(row) == 33 and row[0] == 0 for row in rows)
    # every token read is in a row, cropped, or dropped
    assert 33 * len(rows) + cropped + dropped == sum(map(len, docs))
    assert dropped < 33


def test_pad_mode_places_whole_items_and_masks_padding():
    i1, i2 = ([0, 1, 1, 1, 1], [0, 0, 1, 1, 1]), ([0, 2, 2], [0, 1, 0])  # (ids, mask)
    i3, i4 = ([0, 3, 3, 3], [0, 0, 0, 1]), ([0, 4], [0, 1])
    rows, masks = pack_pad([i1, i2, i3, i4], row_len=8, pad_id=0)
    # row 1: i1 (5) + i2 (3) exactly; row 2: i3 (4) + i4 (2) + 2 pads; nothing is ever cropped
    assert rows == [i1[0] + i2[0], i3[0] + i4[0] + [0, 0]]
    assert masks == [i1[1] + i2[1], i3[1] + i4[1] + [0, 0]]
    inputs, targets = batch_from_rows(rows, masks)
    assert inputs.dtype == torch.int32 and targets.dtype == torch.int64 and inputs.shape == (2, 7)
    # target i is row[i+1], or -1 where mask[i+1] == 0 (masked tokens and padding)
    assert targets.tolist() == [[-1, 1, 1, 1, -1, 2, -1], [-1, -1, 3, -1, 4, -1, -1]]
    assert inputs.tolist() == [row[:-1] for row in rows]
    with pytest.raises(AssertionError, match="truncate"):  # never crops an item longer than a row
        pack_pad([([0] * 9, [1] * 9)], row_len=8, pad_id=0)


# ---------------------------------------------------------------------- Batches from the real corpus


def test_batches_are_bos_aligned_grad_accum_equals_ranks_and_both_resume_midstep(tokenizer, base_dir):
    """One process with grad_accum 2 yields micro batch r of each step = rank r's batch of 2 ranks; a state
    saved mid-step (grad_accum 2), or by each rank, resumes exactly."""
    steps = 70
    single_loader = loader(tokenizer, grad_accum=2)
    single = take(single_loader, 2 * steps - 1)  # odd: the next micro batch is micro-step 1
    state = saved(single_loader)
    single += take(single_loader, 21)
    assert_same_batches(take(loader(tokenizer, grad_accum=2, resume_state=state), 21), single[-21:])
    assert single_loader.epoch == 2  # the comparison runs across an epoch boundary
    for x, y in single:
        assert x.shape == y.shape == (B, T) and x.dtype == torch.int32 and y.dtype == torch.int64
        assert (x[:, 0] == tokenizer.get_bos_token_id()).all()  # every row starts at a document start
        assert torch.equal(y[:, :-1], x[:, 1:].long())  # targets are the inputs shifted by one
        assert (y >= 0).all()  # no padding in crop mode; the synthetic corpus below traces every token
    for r in range(2):
        dl = loader(tokenizer, rank=r, world_size=2)
        assert_same_batches(single[r::2][:steps], take(dl, steps))
        resumed = loader(tokenizer, rank=r, world_size=2, resume_state=saved(dl))
        assert_same_batches(take(resumed, 10), take(dl, 10))
    assert not torch.equal(single[0][0], single[1][0])


def test_resume_yields_the_same_batches_across_blocks_epochs_and_batch_sizes(tokenizer, base_dir):
    m = 12
    dl = loader(tokenizer)
    states, batches = [], []

    def step():
        states.append(saved(dl))
        batches.append(next(dl))

    for _ in range(1000):  # bounded: a loader that never wraps fails instead of hanging
        if dl.epoch > 1:
            break
        step()
    assert dl.epoch == 2, "no epoch boundary within 1000 batches"
    for _ in range(m):
        step()
    slot = [state["slots"]["0"] for state in states]
    starts = range(len(states) - m)
    crosses_block = [n for n in starts if slot[n]["block"] != slot[n + m]["block"]]
    crosses_epoch = [n for n in starts if slot[n]["epoch"] != slot[n + m]["epoch"]]
    assert crosses_block and crosses_epoch
    for n in sorted({0, 5, crosses_block[0], crosses_block[-1], crosses_epoch[0], crosses_epoch[-1]}):
        resumed = loader(tokenizer, resume_state=states[n])
        assert_same_batches(take(resumed, m), batches[n : n + m])
        assert resumed.state_dict() == states[n + m]  # counters included
    resumed = loader(tokenizer, B=2, resume_state=states[5])  # B may change: the row stream goes on
    rows = torch.cat([rows_of(b) for b in batches[5 : 5 + m]])
    assert torch.equal(torch.cat([rows_of(b) for b in take(resumed, 2 * m)]), rows)


def test_state_dict_is_small_json_and_checked_on_resume(tokenizer, base_dir):
    dl = loader(tokenizer, grad_accum=2)
    assert dl.cropped_fraction == 0 and dl.epoch == 1
    take(dl, 9)
    state = dl.state_dict()
    text = json.dumps(state)
    assert json.loads(text) == state and len(text) < 600
    assert set(state["slots"]) == {"0", "1"}
    slots = state["slots"].values()  # stdlib files are far longer than a row: many are cropped
    assert 0 < dl.cropped_fraction == sum(s["cropped"] for s in slots) / sum(s["read"] for s in slots) < 1
    for key, value in (("T", 32), ("split", "val")):
        with pytest.raises(ValueError, match=f"{key}={value!r}"):  # names what differs
            loader(tokenizer, grad_accum=2, resume_state={**state, key: value})
    with pytest.raises(ValueError, match="num_slots=2"):
        loader(tokenizer, resume_state=state)  # 1 slot vs 2


def test_more_slots_than_row_groups_is_a_clear_error(tokenizer, base_dir):
    num_val = len(list_row_groups("val"))
    for kwargs in ({"world_size": num_val + 1, "rank": 0}, {"grad_accum": num_val + 1}):
        with pytest.raises(ValueError, match="ranks x grad_accum"):
            loader(tokenizer, split="val", **kwargs)
    take(loader(tokenizer, split="val", grad_accum=num_val), num_val)  # exactly enough works


def test_loader_throughput(tokenizer, base_dir):
    dl = loader(tokenizer, B=8, T=256)
    next(dl)  # first block
    t0 = time.perf_counter()
    n = sum(next(dl)[0].numel() for _ in range(200))
    dt = time.perf_counter() - t0
    read = dl.state_dict()["slots"]["0"]["read"]
    print(f"\ndataloader B=8 T=256: {n / dt:,.0f} tokens/s yielded, {read / dt:,.0f} tokens/s tokenized")
    assert n / dt > 20_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_land_on_cuda(tokenizer, base_dir):
    x, y = next(loader(tokenizer, device="cuda"))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.int32 and y.dtype == torch.int64
    torch.cuda.synchronize()
    assert torch.equal(y[:, :-1].cpu(), x[:, 1:].long().cpu())


# -------------------------------------------------------- Synthetic corpus: trace every token to its document


class IdTokenizer:
    """Text "id length" -> [BOS] + [id] * (length - 1): every token names its document."""

    def get_bos_token_id(self) -> int:
        return 0

    def encode(self, texts, prepend=None, num_threads=1):
        docs = [map(int, text.split()) for text in texts]
        return [[prepend] + [doc_id] * (length - 1) for doc_id, length in docs]


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """400 docs of even lengths 2..60 (rows of 64 then never hold a lone cropped BOS)."""
    rng = random.Random(1)
    lengths = {i: 2 * rng.randint(1, 30) for i in range(1, 401)}
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    write_shards([f"{i} {n}" for i, n in lengths.items()], "synthetic", None)
    return lengths


def test_ranks_read_disjoint_documents_and_every_one(synthetic):
    lengths = synthetic
    seen_by_rank = []
    for rank in range(2):
        own = {int(t.split()[0]) for g in parquets_iter_batched("train", rank, 2) for t in g}
        dl = DataLoader(IdTokenizer(), 1, 63, "train", rank, 2)
        seen, in_rows = [], 0
        state = dl.state_dict()
        for _ in range(5000):
            (row,) = rows_of(next(dl)).tolist()
            if dl.epoch == 2:
                break  # that row opened the next epoch
            state = dl.state_dict()
            in_rows += len(row)
            starts = [k for k, t in enumerate(row) if t == 0] + [len(row)]
            for a, b in zip(starts, starts[1:], strict=False):
                segment, doc_id = row[a:b], row[a + 1]
                assert segment == [0] + [doc_id] * (len(segment) - 1)
                if b < len(row):  # only the last doc of a row may be cropped
                    assert len(segment) == lengths[doc_id]
                seen.append(doc_id)
        assert dl.epoch == 2, "no epoch boundary within 5000 rows"
        counters = state["slots"][str(rank)]
        assert len(seen) == len(set(seen)) and set(seen) <= own  # each doc once, from own row groups
        assert counters["read"] == sum(lengths[i] for i in own)
        assert counters["read"] == in_rows + counters["cropped"] + counters["dropped"]
        # the docs never seen are exactly the leftovers dropped at block ends
        assert sum(lengths[i] for i in own - set(seen)) == counters["dropped"]
        assert counters["dropped"] < 64 * len(list_row_groups("train")[rank::2])
        seen_by_rank.append(set(seen))
    assert not seen_by_rank[0] & seen_by_rank[1]
    train = {int(t.split()[0]) for g in parquets_iter_batched("train") for t in g}
    assert len(seen_by_rank[0] | seen_by_rank[1]) > 0.9 * len(train)


def test_loader_rows_are_a_fixed_shuffle_of_the_packed_block_and_too_short_docs_an_error(synthetic):
    texts = next(parquets_iter_batched("train"))
    rows, _, _ = pack_crop(IdTokenizer().encode(texts, prepend=0), 64)
    n = len(rows)
    first = [rows_of(next(DataLoader(IdTokenizer(), n, 63, "train"))).tolist() for _ in "ab"]
    assert first[0] == first[1]  # deterministic
    assert sorted(first[0]) == sorted(rows) and first[0] != rows  # same rows, shuffled
    with pytest.raises(ValueError, match="T\\+1=100001"):  # no doc fills a row
        next(DataLoader(IdTokenizer(), 1, 100_000, "train"))
