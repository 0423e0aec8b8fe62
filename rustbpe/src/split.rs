//! Pre-tokenization: cutting text into the chunks that BPE never merges across.
//!
//! Any pattern goes through `fancy_regex`. The default pattern (the GPT-4 split with
//! digits grouped 1–2, see `DEFAULT_PATTERN`) is instead matched by a hand-written
//! scanner that gives exactly the same chunks at a fraction of the cost: the regex
//! split was most of the training time. Its character classes (`\p{L}`, `\p{N}`, `\s`
//! and the case-insensitive contraction letters) come from `regex_syntax`, the very
//! tables `fancy_regex` uses, so the two agree on every Unicode code point; the tests
//! compare them on random and real text.

use std::sync::OnceLock;

use fancy_regex::Regex;
use regex_syntax::hir::{Class, HirKind};

/// GPT-4's split pattern with numbers grouped in runs of at most two digits.
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

// One byte of class bits per Unicode scalar value.
const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
const SPACE: u8 = 4; // \s
const CI_SDMT: u8 = 8; // (?i)[sdmt]
const CI_L: u8 = 16; // (?i)l
const CI_V: u8 = 32; // (?i)v
const CI_E: u8 = 64; // (?i)e
const CI_R: u8 = 128; // (?i)r

fn class_table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = vec![0u8; 0x11_0000];
        for (pattern, bit) in [
            (r"\p{L}", LETTER),
            (r"\p{N}", NUMBER),
            (r"\s", SPACE),
            (r"(?i)[sdmt]", CI_SDMT),
            (r"(?i)l", CI_L),
            (r"(?i)v", CI_V),
            (r"(?i)e", CI_E),
            (r"(?i)r", CI_R),
        ] {
            let hir = regex_syntax::parse(pattern).expect("built-in class pattern");
            let ranges: Vec<(u32, u32)> = match hir.kind() {
                HirKind::Class(Class::Unicode(class)) => class
                    .ranges()
                    .iter()
                    .map(|r| (r.start() as u32, r.end() as u32))
                    .collect(),
                HirKind::Literal(lit) => {
                    let c = std::str::from_utf8(&lit.0).unwrap().chars().next().unwrap() as u32;
                    vec![(c, c)]
                }
                other => panic!("unexpected class shape for {pattern}: {other:?}"),
            };
            for (lo, hi) in ranges {
                for slot in &mut table[lo as usize..=hi as usize] {
                    *slot |= bit;
                }
            }
        }
        table
    })
}

/// Splits text into chunks with either the fast scanner or a compiled regex.
pub enum Splitter {
    Fast(&'static [u8]),
    Regex(Box<Regex>),
}

impl Splitter {
    /// Compiles `pattern`; the default pattern gets the hand-written scanner.
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern == DEFAULT_PATTERN {
            return Ok(Splitter::Fast(class_table()));
        }
        Regex::new(pattern)
            .map(|re| Splitter::Regex(Box::new(re)))
            .map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// The regex engine even for the default pattern (the scanner's reference).
    pub fn regex_only(pattern: &str) -> Result<Self, String> {
        Regex::new(pattern)
            .map(|re| Splitter::Regex(Box::new(re)))
            .map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// Calls `f` on every chunk of `text`, in order.
    pub fn for_each_chunk<'t>(
        &self,
        text: &'t str,
        mut f: impl FnMut(&'t str),
    ) -> Result<(), String> {
        match self {
            Splitter::Fast(table) => {
                let mut scanner = Scanner { text, table };
                let mut start = 0;
                while start < text.len() {
                    let end = scanner.chunk_end(start);
                    f(&text[start..end]);
                    start = end;
                }
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed on the text: {e}"))?;
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
            }
        }
        Ok(())
    }
}

struct Scanner<'t> {
    text: &'t str,
    table: &'static [u8],
}

impl Scanner<'_> {
    /// The character at byte offset `i`, its class bits and its byte length.
    #[inline]
    fn at(&self, i: usize) -> Option<(char, u8, usize)> {
        let b = *self.text.as_bytes().get(i)?;
        if b < 0x80 {
            return Some((b as char, self.table[b as usize], 1));
        }
        let c = self.text[i..].chars().next()?;
        Some((c, self.table[c as usize], c.len_utf8()))
    }

    /// End of the first run of characters from `i` whose class bits intersect `mask`.
    #[inline]
    fn skip_while(&self, mut i: usize, mask: u8) -> usize {
        while let Some((_, bits, n)) = self.at(i) {
            if bits & mask == 0 {
                break;
            }
            i += n;
        }
        i
    }

    /// End (exclusive) of the chunk starting at `start`; the alternatives are tried in
    /// the pattern's order, the first that matches wins, as in the regex.
    fn chunk_end(&mut self, start: usize) -> usize {
        let (c, bits, n) = self.at(start).expect("start is inside the text");
        let is_punct = |bits: u8| bits & (SPACE | LETTER | NUMBER) == 0;
        let next = self.at(start + n);

        // '(?i:[sdmt]|ll|ve|re)
        if c == '\'' {
            if let Some((_, b2, n2)) = next {
                if b2 & CI_SDMT != 0 {
                    return start + n + n2;
                }
                if let Some((_, b3, n3)) = self.at(start + n + n2) {
                    let pair = (b2 & CI_L != 0 && b3 & CI_L != 0)
                        || (b2 & CI_V != 0 && b3 & CI_E != 0)
                        || (b2 & CI_R != 0 && b3 & CI_E != 0);
                    if pair {
                        return start + n + n2 + n3;
                    }
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?+\p{L}+
        if bits & LETTER != 0 {
            return self.skip_while(start + n, LETTER);
        }
        if c != '\r' && c != '\n' && bits & NUMBER == 0 {
            if let Some((_, b2, n2)) = next {
                if b2 & LETTER != 0 {
                    return self.skip_while(start + n + n2, LETTER);
                }
            }
        }
        // \p{N}{1,2}
        if bits & NUMBER != 0 {
            return match next {
                Some((_, b2, n2)) if b2 & NUMBER != 0 => start + n + n2,
                _ => start + n,
            };
        }
        // ` ?[^\s\p{L}\p{N}]++[\r\n]*`
        let punct_start = match next {
            Some((_, b2, _)) if c == ' ' && is_punct(b2) => Some(start + 1),
            _ if is_punct(bits) => Some(start),
            _ => None,
        };
        if let Some(p) = punct_start {
            let mut end = p;
            while let Some((_, b, k)) = self.at(end) {
                if !is_punct(b) {
                    break;
                }
                end += k;
            }
            while let Some(b) = self.text.as_bytes().get(end) {
                if *b != b'\r' && *b != b'\n' {
                    break;
                }
                end += 1;
            }
            return end;
        }
        // Only whitespace is left. Scan its run once for the three remaining alternatives.
        let mut end = start;
        let mut last_start = start;
        let mut after_newline = None;
        while let Some((ch, b, k)) = self.at(end) {
            if b & SPACE == 0 {
                break;
            }
            if ch == '\r' || ch == '\n' {
                after_newline = Some(end + k);
            }
            last_start = end;
            end += k;
        }
        debug_assert!(
            end > start,
            "every non-space character is a letter, number or punctuation"
        );
        // \s*[\r\n]: the longest whitespace prefix that ends in a line break
        if let Some(e) = after_newline {
            return e;
        }
        // \s+(?!\S): all of the run at the end of the text, else all but its last char
        if end == self.text.len() {
            return end;
        }
        if last_start > start {
            return last_start;
        }
        // \s+
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(splitter: &Splitter, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        splitter
            .for_each_chunk(text, |c| out.push(c.to_string()))
            .unwrap();
        out
    }

    fn assert_same_as_regex(text: &str) {
        let fast = Splitter::new(DEFAULT_PATTERN).unwrap();
        let slow = Splitter::regex_only(DEFAULT_PATTERN).unwrap();
        assert!(matches!(fast, Splitter::Fast(_)));
        assert_eq!(chunks(&fast, text), chunks(&slow, text), "text: {text:?}");
    }

    #[test]
    fn scanner_matches_regex_on_hand_picked_cases() {
        for text in [
            "Hello world",
            "I'm here, you're there; they'll go. It's HIS'S 'LL 'Ve 're 'x 'ſ",
            "'hello '' ''' 'S",
            "numbers 1 12 123 1234 ١٢٣ ²³ ⅫⅩ",
            "  leading and trailing   ",
            "line\nbreaks\r\nand\n\n\n  indented\n    code\t\tx",
            "x  \n  y \t\r\n z",
            "punct!!! ...and (parens) [x] {y} ?!\n\n",
            " ?? \n",
            "emoji 👋🏽 and CJK 你好世界 and accents café naïve",
            "tabs\t\tand\u{0b}vertical\u{0c}feeds\u{85}nel\u{a0}nbsp\u{2028}ls\u{3000}ideo",
            "combining e\u{301} marks \u{301}\u{301}x",
            "\r\r\r",
            "\n",
            " ",
            "  ",
            "a",
            "'",
            "$12.50 + 3*x_y == z",
        ] {
            assert_same_as_regex(text);
        }
    }

    /// A tiny deterministic generator, so the test needs no extra crates.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn scanner_matches_regex_on_random_text() {
        // Characters chosen to hit every branch: contractions, case folding (ſ, K),
        // all kinds of space and line break, digits of several scripts, marks, emoji.
        let pool: Vec<char> = "aAsStTlLvVeErRdDmMſKk'' \t\r\n\u{b}\u{c}\u{85}\u{a0}\u{2028}\u{3000}0123456789٣²Ⅻ.,!?-_()[]{}$#@\\/\"é\u{301}你好👋🏽𝔸"
            .chars()
            .collect();
        let mut rng = Lcg(42);
        for _ in 0..20_000 {
            let len = (rng.next() % 24) as usize;
            let text: String = (0..len)
                .map(|_| {
                    if rng.next().is_multiple_of(20) {
                        // any scalar value, assigned or not
                        loop {
                            if let Some(c) = char::from_u32((rng.next() % 0x11_0000) as u32) {
                                break c;
                            }
                        }
                    } else {
                        pool[(rng.next() as usize) % pool.len()]
                    }
                })
                .collect();
            assert_same_as_regex(&text);
        }
    }

    #[test]
    fn scanner_matches_regex_on_real_text() {
        let Some(text) = crate::test_data::tinyshakespeare() else {
            return;
        };
        assert_same_as_regex(&text);
    }

    #[test]
    fn chunks_cover_the_text_exactly() {
        let fast = Splitter::new(DEFAULT_PATTERN).unwrap();
        let text = "It's 2024!\r\n  Ça va? 😀😀  ";
        assert_eq!(chunks(&fast, text).concat(), text);
    }

    #[test]
    fn custom_and_invalid_patterns() {
        let words = Splitter::new(r"\w+|\s+").unwrap();
        assert_eq!(chunks(&words, "ab  cd"), ["ab", "  ", "cd"]);
        let err = Splitter::new("(unclosed").err().unwrap();
        assert!(err.contains("invalid split pattern"), "{err}");
    }
}
