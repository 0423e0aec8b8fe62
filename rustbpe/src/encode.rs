//! Encoding text with a trained vocabulary, with exactly tiktoken's semantics, so the
//! ids equal those of a `tiktoken.Encoding` built from the same ranks:
//! a chunk that is itself a token is one id; otherwise start from single bytes and
//! repeatedly merge the adjacent pair whose concatenation has the lowest rank
//! (leftmost on ties). The "concatenation is a token" test is precomputed as a
//! (left id, right id) → merged id table, so the inner loop hashes two u32s instead of
//! byte strings.

use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::split::Splitter;

pub struct Encoder {
    splitter: Splitter,
    vocab: hashbrown::HashMap<Vec<u8>, u32, FxBuildHasher>,
    byte_ids: [u32; 256],
    merged: FxHashMap<u64, u32>,
}

#[inline]
fn pack(left: u32, right: u32) -> u64 {
    ((left as u64) << 32) | right as u64
}

impl Encoder {
    /// `tokens[id]` is the byte string of token `id`; all 256 single bytes must be present.
    pub fn new(splitter: Splitter, tokens: &[Vec<u8>]) -> Result<Encoder, String> {
        let mut vocab = hashbrown::HashMap::with_capacity_and_hasher(tokens.len(), FxBuildHasher);
        for (id, bytes) in tokens.iter().enumerate() {
            // keep the lowest id if a byte string repeats
            vocab.entry(bytes.clone()).or_insert(id as u32);
        }
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *vocab
                .get(&[b as u8][..])
                .ok_or_else(|| format!("byte {b} has no token"))?;
        }
        let mut merged = FxHashMap::default();
        for (id, bytes) in tokens.iter().enumerate() {
            if vocab[bytes] != id as u32 {
                continue;
            }
            for cut in 1..bytes.len() {
                if let (Some(&l), Some(&r)) = (vocab.get(&bytes[..cut]), vocab.get(&bytes[cut..])) {
                    merged.insert(pack(l, r), id as u32);
                }
            }
        }
        Ok(Encoder {
            splitter,
            vocab,
            byte_ids,
            merged,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut parts = Vec::new();
        let mut ranks = Vec::new();
        self.splitter.for_each_chunk(text, |chunk| {
            self.encode_chunk(chunk.as_bytes(), &mut ids, &mut parts, &mut ranks)
        })?;
        Ok(ids)
    }

    #[inline]
    fn rank(&self, left: u32, right: u32) -> u32 {
        self.merged
            .get(&pack(left, right))
            .copied()
            .unwrap_or(u32::MAX)
    }

    fn encode_chunk(
        &self,
        chunk: &[u8],
        out: &mut Vec<u32>,
        parts: &mut Vec<u32>,
        ranks: &mut Vec<u32>,
    ) {
        if let Some(&id) = self.vocab.get(chunk) {
            out.push(id);
            return;
        }
        parts.clear();
        parts.extend(chunk.iter().map(|&b| self.byte_ids[b as usize]));
        ranks.clear();
        ranks.extend(parts.windows(2).map(|w| self.rank(w[0], w[1])));
        // leftmost lowest rank; ranks[i] belongs to the pair (parts[i], parts[i + 1])
        while let Some((i, &best)) = ranks.iter().enumerate().min_by_key(|&(i, &r)| (r, i)) {
            if best == u32::MAX {
                break;
            }
            parts[i] = best;
            parts.remove(i + 1);
            ranks.remove(i);
            if i > 0 {
                ranks[i - 1] = self.rank(parts[i - 1], parts[i]);
            }
            if i < ranks.len() {
                ranks[i] = self.rank(parts[i], parts[i + 1]);
            }
        }
        out.extend_from_slice(parts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::DEFAULT_PATTERN;
    use crate::train::{token_bytes, train_on_texts};

    #[test]
    fn encodes_with_lowest_rank_first() {
        // merges: (a, b) → 256, (b, c) → 257; "abc" → [ab, c] because ab ranks lower
        let tokens = token_bytes(&[(97, 98), (98, 99)]);
        let enc = Encoder::new(Splitter::new(DEFAULT_PATTERN).unwrap(), &tokens).unwrap();
        assert_eq!(enc.encode("abc").unwrap(), vec![256, 99]);
        assert_eq!(enc.encode("bc").unwrap(), vec![257]);
        assert_eq!(enc.encode("").unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn round_trips_text() {
        let splitter = Splitter::new(DEFAULT_PATTERN).unwrap();
        let texts: Vec<String> = ["hello world, hello there! 你好 你好 👋👋 12345"; 5]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let merges = train_on_texts(&splitter, &texts, 40).unwrap();
        let tokens = token_bytes(&merges);
        let enc = Encoder::new(splitter, &tokens).unwrap();
        let text = "hello there, world 你好👋 999";
        let ids = enc.encode(text).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| tokens[i as usize].clone())
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
        assert!(ids.len() < text.len());
    }
}
