//! Python bindings for the BPE trainer (the algorithms live in split.rs and train.rs and
//! know nothing about Python). Encoding is tiktoken's job, built from the ranks.
//!
//! - Texts are pulled from the Python iterator in buffers with the GIL held; all
//!   splitting, counting and merging runs with the GIL released.
//! - Every user error is a Python exception (ValueError / TypeError, or the iterator's
//!   own exception), never a panic.
//! - `num_threads` runs the work on a private rayon pool of that size; without it the
//!   global pool is used (sized by RAYON_NUM_THREADS or the number of cores).

pub mod split;
pub mod train;

#[cfg(test)]
mod test_data {
    /// tinyshakespeare from the shared data folder beside the repo, if it is there.
    pub fn tinyshakespeare() -> Option<String> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/pretrain/tinyshakespeare.txt"
        );
        let text = std::fs::read_to_string(path).ok();
        if text.is_none() {
            eprintln!("skipped: {path} not found");
        }
        text
    }
}

use std::time::Instant;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::split::{Splitter, DEFAULT_PATTERN};
use crate::train::{ChunkCounts, Pair, Words};

/// A byte-level BPE tokenizer: train it, read its ranks.
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    merges: Vec<Pair>,
}

fn thread_pool(num_threads: Option<usize>) -> PyResult<Option<rayon::ThreadPool>> {
    match num_threads {
        None | Some(0) => Ok(None),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map(Some)
            .map_err(|e| PyRuntimeError::new_err(format!("could not start {n} threads: {e}"))),
    }
}

fn run_in<T: Send>(pool: &Option<rayon::ThreadPool>, work: impl FnOnce() -> T + Send) -> T {
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

#[pymethods]
impl Tokenizer {
    /// An untrained tokenizer (256 byte tokens, the default split pattern).
    #[new]
    fn new() -> Self {
        Tokenizer {
            pattern: DEFAULT_PATTERN.to_string(),
            merges: Vec::new(),
        }
    }

    /// Trains on the str items of `iterator` until the vocabulary has `vocab_size` tokens
    /// (256 bytes + merges), replacing any earlier training.
    #[allow(clippy::too_many_arguments)] // the Python signature: keyword arguments with defaults
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None, num_threads = None, verbose = false))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: usize,
        pattern: Option<String>,
        num_threads: Option<usize>,
        verbose: bool,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (one token per byte), got {vocab_size}"
            )));
        }
        if buffer_size == 0 {
            return Err(PyValueError::new_err("buffer_size must be at least 1"));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;
        let pool = thread_pool(num_threads)?;
        let started = Instant::now();

        // 1. Pull texts in buffers (GIL held) and count their chunks (GIL released).
        let mut counts = ChunkCounts::default();
        let (mut num_texts, mut num_bytes) = (0usize, 0usize);
        let mut items = iterator.try_iter()?;
        loop {
            let mut buffer = Vec::with_capacity(buffer_size);
            for item in items.by_ref().take(buffer_size) {
                let item = item?;
                let text: String = item.extract().map_err(|_| {
                    let type_name = item
                        .get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|_| "?".into());
                    PyTypeError::new_err(format!(
                        "train_from_iterator needs str items, but item {} is {type_name}",
                        num_texts + buffer.len()
                    ))
                })?;
                buffer.push(text);
            }
            if buffer.is_empty() {
                break;
            }
            num_texts += buffer.len();
            num_bytes += buffer.iter().map(String::len).sum::<usize>();
            py.detach(|| run_in(&pool, || counts.add_texts(&splitter, &buffer)))
                .map_err(PyRuntimeError::new_err)?;
            if verbose {
                eprintln!(
                    "rustbpe: {num_texts} texts, {:.1} MB, {} distinct chunks ({:.1}s)",
                    num_bytes as f64 / 1e6,
                    counts.len(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if counts.is_empty() {
            return Err(PyValueError::new_err(format!(
                "the training iterator gave no text to train on ({num_texts} items, all empty)"
            )));
        }

        // 2. Merge until the vocabulary is full.
        let num_merges = (vocab_size - 256) as usize;
        let merges = py.detach(|| {
            run_in(&pool, || {
                let mut last_report = Instant::now();
                train::train(Words::from_counts(counts), num_merges, |done, total| {
                    if verbose && (done == total || last_report.elapsed().as_secs_f64() >= 2.0) {
                        last_report = Instant::now();
                        eprintln!(
                            "rustbpe: merge {done}/{total} ({:.0}%, {:.1}s)",
                            100.0 * done as f64 / total as f64,
                            started.elapsed().as_secs_f64()
                        );
                    }
                })
            })
        });
        self.pattern = pattern;
        self.merges = merges;
        Ok(())
    }

    /// The regex pattern that splits text into chunks.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// `[(token_bytes, rank)]`: the 256 single bytes first, then merges in order.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        train::token_bytes(&self.merges)
            .iter()
            .enumerate()
            .map(|(rank, bytes)| (PyBytes::new(py, bytes), rank as u32))
            .collect()
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}
