//! Byte-level BPE training, in plain Rust (the Python bindings live in lib.rs).
//!
//! - Texts are split into chunks (see split.rs) and each distinct chunk is counted once;
//!   chunks are counted in parallel per buffer of texts, borrowing from the texts.
//! - Distinct chunks of two or more bytes become "words": symbol sequences kept in one
//!   flat array (no per-word allocation), each with its corpus count.
//! - Every pair keeps a running count and a list of the words that may contain it. A
//!   merge rewrites only the words on its list (in parallel when there are many) and
//!   applies the exact count changes around each merged spot; the corpus is never
//!   recounted. Word lists may hold stale entries; rewriting such a word is a no-op.
//! - The next merge comes from a max-heap with lazy refresh: counts of existing pairs
//!   only ever go down, so a popped entry whose count is stale is pushed back with its
//!   true count, and an entry that is current is the true maximum.
//! - Order is total and deterministic: highest count first, ties to the smallest
//!   (left_id, right_id). Counts are exact integer sums, so the thread count cannot
//!   change the result.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::split::Splitter;

/// A merge: the pair of token ids that became a new token.
pub type Pair = (u32, u32);

/// Pairs are packed into a u64 whose ordering is the lexicographic order of (left, right).
#[inline]
fn pack(left: u32, right: u32) -> u64 {
    ((left as u64) << 32) | right as u64
}

#[inline]
fn unpack(key: u64) -> Pair {
    ((key >> 32) as u32, key as u32)
}

/// Counts of distinct chunks over all texts seen so far.
#[derive(Default)]
pub struct ChunkCounts {
    counts: hashbrown::HashMap<Box<str>, i64, FxBuildHasher>,
}

impl ChunkCounts {
    /// Splits `texts` (in parallel on the current rayon pool) and adds their chunks.
    pub fn add_texts(&mut self, splitter: &Splitter, texts: &[String]) -> Result<(), String> {
        let local = texts
            .par_iter()
            .with_min_len(16)
            .try_fold(FxHashMap::<&str, i64>::default, |mut counts, text| {
                splitter.for_each_chunk(text, |chunk| *counts.entry(chunk).or_insert(0) += 1)?;
                Ok::<_, String>(counts)
            })
            .try_reduce(FxHashMap::default, |a, b| {
                let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                for (chunk, n) in small {
                    *big.entry(chunk).or_insert(0) += n;
                }
                Ok(big)
            })?;
        self.counts.reserve(local.len() / 4);
        for (chunk, n) in local {
            *self.counts.entry_ref(chunk).or_insert(0) += n;
        }
        Ok(())
    }

    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// Distinct chunks as symbol sequences in one flat array.
pub struct Words {
    syms: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

impl Words {
    /// Words of two bytes or more (a single byte has no pair, so it never matters).
    pub fn from_counts(chunks: ChunkCounts) -> Words {
        let mut words = Words {
            syms: Vec::new(),
            start: Vec::new(),
            len: Vec::new(),
            count: Vec::new(),
        };
        for (chunk, n) in chunks.counts {
            let bytes = chunk.as_bytes();
            if bytes.len() < 2 {
                continue;
            }
            words.start.push(words.syms.len());
            words.len.push(bytes.len() as u32);
            words.count.push(n);
            words.syms.extend(bytes.iter().map(|&b| b as u32));
        }
        words
    }

    /// Words given directly as byte strings with counts (for tests and tools).
    pub fn from_pairs<'a>(items: impl IntoIterator<Item = (&'a [u8], i64)>) -> Words {
        let mut chunks = ChunkCounts::default();
        for (bytes, n) in items {
            let text = std::str::from_utf8(bytes).expect("test words are UTF-8");
            *chunks.counts.entry_ref(text).or_insert(0) += n;
        }
        Words::from_counts(chunks)
    }

    fn num_words(&self) -> usize {
        self.start.len()
    }
}

#[derive(Default)]
struct PairStat {
    count: i64,
    /// Words that may contain the pair (may repeat, may be stale).
    words: Vec<u32>,
}

/// Count changes and new word lists produced by rewriting some words for one merge.
#[derive(Default)]
struct MergeDelta {
    counts: FxHashMap<u64, i64>,
    new_pairs: FxHashMap<u64, Vec<u32>>,
}

impl MergeDelta {
    fn absorb(mut self, mut other: MergeDelta) -> MergeDelta {
        if other.counts.len() > self.counts.len() {
            std::mem::swap(&mut self, &mut other);
        }
        for (key, d) in other.counts {
            *self.counts.entry(key).or_insert(0) += d;
        }
        for (key, words) in other.new_pairs {
            self.new_pairs.entry(key).or_default().extend(words);
        }
        self
    }
}

/// Rewrites one word (`syms[..len]`), replacing each left-to-right occurrence of
/// (a, b) with `new`, and records the pair count changes. Returns the new length.
#[inline]
fn merge_word(
    syms: &mut [u32],
    a: u32,
    b: u32,
    new: u32,
    count: i64,
    word: u32,
    delta: &mut MergeDelta,
) -> usize {
    let len = syms.len();
    let note_new = |key: u64, delta: &mut MergeDelta| {
        *delta.counts.entry(key).or_insert(0) += count;
        let list = delta.new_pairs.entry(key).or_default();
        if list.last() != Some(&word) {
            list.push(word);
        }
    };
    let (mut read, mut write) = (0, 0);
    while read < len {
        if read + 1 < len && syms[read] == a && syms[read + 1] == b {
            // the symbol before is already rewritten (it may be `new` itself)
            if write > 0 {
                let prev = syms[write - 1];
                *delta.counts.entry(pack(prev, a)).or_insert(0) -= count;
                note_new(pack(prev, new), delta);
            }
            *delta.counts.entry(pack(a, b)).or_insert(0) -= count;
            if read + 2 < len {
                let next = syms[read + 2];
                *delta.counts.entry(pack(b, next)).or_insert(0) -= count;
                note_new(pack(new, next), delta);
            }
            syms[write] = new;
            read += 2;
        } else {
            syms[write] = syms[read];
            read += 1;
        }
        write += 1;
    }
    write
}

/// Shares the flat word arrays across rayon tasks that touch disjoint words.
struct SharedWords {
    syms: *mut u32,
    len: *mut u32,
}
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Rewrites word `w` (its symbols start at `start`) with `f`, which returns the new length.
    ///
    /// SAFETY: no two calls at the same time may pass the same `w`.
    #[inline]
    unsafe fn rewrite(&self, w: usize, start: usize, f: impl FnOnce(&mut [u32]) -> usize) {
        let len_slot = self.len.add(w);
        let syms = std::slice::from_raw_parts_mut(self.syms.add(start), *len_slot as usize);
        *len_slot = f(syms) as u32;
    }
}

/// Below this many words a merge is applied on one thread.
const PARALLEL_WORDS: usize = 4096;

fn apply_merge(words: &mut Words, key: u64, new: u32, mut targets: Vec<u32>) -> MergeDelta {
    let (a, b) = unpack(key);
    targets.sort_unstable();
    targets.dedup();
    let shared = SharedWords {
        syms: words.syms.as_mut_ptr(),
        len: words.len.as_mut_ptr(),
    };
    let (start, count) = (&words.start, &words.count);
    let rewrite = |chunk: &[u32]| {
        let mut delta = MergeDelta::default();
        for &w in chunk {
            let i = w as usize;
            // SAFETY: `targets` is deduplicated, so each word (a disjoint range of `syms`
            // and one slot of `len`) is rewritten by exactly one task.
            unsafe {
                shared.rewrite(i, start[i], |syms| {
                    merge_word(syms, a, b, new, count[i], w, &mut delta)
                })
            };
        }
        delta
    };
    if targets.len() < PARALLEL_WORDS {
        rewrite(&targets)
    } else {
        let chunk_len = targets.len().div_ceil(rayon::current_num_threads() * 4);
        targets
            .par_chunks(chunk_len)
            .map(rewrite)
            .reduce(MergeDelta::default, MergeDelta::absorb)
    }
}

fn initial_pair_stats(words: &Words) -> FxHashMap<u64, PairStat> {
    (0..words.num_words())
        .into_par_iter()
        .with_min_len(1024)
        .fold(FxHashMap::<u64, PairStat>::default, |mut stats, w| {
            let s = words.start[w];
            let syms = &words.syms[s..s + words.len[w] as usize];
            for win in syms.windows(2) {
                let stat = stats.entry(pack(win[0], win[1])).or_default();
                stat.count += words.count[w];
                if stat.words.last() != Some(&(w as u32)) {
                    stat.words.push(w as u32);
                }
            }
            stats
        })
        .reduce(FxHashMap::default, |a, b| {
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
            for (key, stat) in small {
                let into = big.entry(key).or_default();
                into.count += stat.count;
                into.words.extend(stat.words);
            }
            big
        })
}

/// Learns up to `num_merges` merges; fewer if the words run out of pairs.
/// `progress(done, total)` is called after every merge.
pub fn train(
    mut words: Words,
    num_merges: usize,
    mut progress: impl FnMut(usize, usize),
) -> Vec<Pair> {
    let mut stats = initial_pair_stats(&words);
    let mut heap: BinaryHeap<(i64, Reverse<u64>)> = stats
        .iter()
        .filter(|(_, s)| s.count > 0)
        .map(|(&k, s)| (s.count, Reverse(k)))
        .collect();
    let mut merges = Vec::with_capacity(num_merges);
    while merges.len() < num_merges {
        let Some((count, Reverse(key))) = heap.pop() else {
            break;
        };
        let current = stats.get(&key).map_or(0, |s| s.count);
        if current != count {
            debug_assert!(current < count, "existing pairs only lose counts");
            if current > 0 {
                heap.push((current, Reverse(key)));
            } else {
                stats.remove(&key);
            }
            continue;
        }
        let new = 256 + merges.len() as u32;
        merges.push(unpack(key));
        let targets = stats.remove(&key).map(|s| s.words).unwrap_or_default();
        let delta = apply_merge(&mut words, key, new, targets);
        for (k, d) in delta.counts {
            if k != key {
                stats.entry(k).or_default().count += d;
            } else {
                debug_assert_eq!(d, -count, "a merged pair disappears from every word");
            }
        }
        for (k, list) in delta.new_pairs {
            let stat = stats.entry(k).or_default();
            stat.words.extend(list);
            if stat.count > 0 {
                heap.push((stat.count, Reverse(k)));
            }
        }
        progress(merges.len(), num_merges);
    }
    merges
}

/// Counts chunks of `texts` and trains: what the bindings do, without Python, for the tests.
#[cfg(test)]
pub fn train_on_texts(
    splitter: &Splitter,
    texts: &[String],
    num_merges: usize,
) -> Result<Vec<Pair>, String> {
    let mut counts = ChunkCounts::default();
    counts.add_texts(splitter, texts)?;
    Ok(train(Words::from_counts(counts), num_merges, |_, _| {}))
}

/// The byte string of every token: 256 single bytes, then one per merge.
pub fn token_bytes(merges: &[Pair]) -> Vec<Vec<u8>> {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut bytes = tokens[a as usize].clone();
        bytes.extend_from_slice(&tokens[b as usize]);
        tokens.push(bytes);
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::DEFAULT_PATTERN;

    /// The obvious algorithm: recount every pair of every word before each merge.
    fn reference_train(words: &[(Vec<u32>, i64)], num_merges: usize) -> Vec<Pair> {
        let mut words = words.to_vec();
        let mut merges = Vec::new();
        for k in 0..num_merges {
            let mut counts: std::collections::BTreeMap<Pair, i64> = Default::default();
            for (w, n) in &words {
                for win in w.windows(2) {
                    *counts.entry((win[0], win[1])).or_insert(0) += n;
                }
            }
            // highest count, then smallest pair (BTreeMap iterates pairs in ascending order)
            let Some((&best, &c)) = counts.iter().max_by_key(|(p, c)| (**c, Reverse(**p))) else {
                break;
            };
            if c <= 0 {
                break;
            }
            let new = 256 + k as u32;
            for (w, _) in &mut words {
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                        out.push(new);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
            merges.push(best);
        }
        merges
    }

    fn as_symbol_words(items: &[(&str, i64)]) -> Vec<(Vec<u32>, i64)> {
        items
            .iter()
            .map(|(s, n)| (s.bytes().map(u32::from).collect(), *n))
            .collect()
    }

    #[test]
    fn merges_match_reference_on_overlapping_runs() {
        let items = [
            ("aaaa", 3),
            ("aaa", 2),
            ("abab", 5),
            ("ababab", 1),
            ("ba", 4),
            ("bbbb", 2),
        ];
        let expected = reference_train(&as_symbol_words(&items), 12);
        let words = Words::from_pairs(items.iter().map(|(s, n)| (s.as_bytes(), *n)));
        assert_eq!(train(words, 12, |_, _| {}), expected);
    }

    #[test]
    fn ties_go_to_the_smallest_pair() {
        // "ab" and "cd" both occur twice; (a, b) < (c, d) so it is merged first
        let words = Words::from_pairs([(&b"cd"[..], 2), (&b"ab"[..], 2)]);
        assert_eq!(train(words, 2, |_, _| {}), vec![(97, 98), (99, 100)]);
    }

    #[test]
    fn stops_when_no_pair_is_left() {
        let words = Words::from_pairs([(&b"abc"[..], 1)]);
        assert_eq!(train(words, 10, |_, _| {}).len(), 2);
    }

    fn random_words(seed: u64, n: usize) -> Vec<(String, i64)> {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        (0..n)
            .map(|_| {
                let len = 2 + next() % 9;
                let word: String = (0..len).map(|_| b"aabbbcde"[next() % 8] as char).collect();
                (word, 1 + (next() % 50) as i64)
            })
            .collect()
    }

    #[test]
    fn merges_match_reference_on_random_words_serial_and_parallel() {
        // 20k distinct-ish words: big enough that early merges take the parallel path
        let items = random_words(7, 20_000);
        let as_ref: Vec<(&str, i64)> = items.iter().map(|(s, n)| (s.as_str(), *n)).collect();
        let expected = reference_train(&as_symbol_words(&as_ref), 60);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let words = Words::from_pairs(items.iter().map(|(s, n)| (s.as_bytes(), *n)));
            let got = pool.install(|| train(words, 60, |_, _| {}));
            assert_eq!(got, expected, "threads = {threads}");
        }
    }

    #[test]
    fn training_on_text_is_thread_count_independent() {
        let Some(text) = crate::test_data::tinyshakespeare() else {
            return;
        };
        let texts: Vec<String> = text.lines().map(|l| format!("{l}\n")).collect();
        let splitter = Splitter::new(DEFAULT_PATTERN).unwrap();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let two = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let a = one
            .install(|| train_on_texts(&splitter, &texts, 500))
            .unwrap();
        let b = two
            .install(|| train_on_texts(&splitter, &texts, 500))
            .unwrap();
        assert_eq!(a.len(), 500);
        assert_eq!(a, b);
    }

    #[test]
    fn token_bytes_concatenate_merges() {
        let tokens = token_bytes(&[(104, 105), (256, 33)]);
        assert_eq!(tokens[256], b"hi");
        assert_eq!(tokens[257], b"hi!");
    }
}
