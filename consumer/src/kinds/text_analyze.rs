//! `text.analyze`: `decode -> analyze -> digest`.
//!
//! Input `{"text": "..."}`; output word, character and line counts, the five most frequent
//! words, and the SHA-256 of the text (see [`shared::schema::TextAnalysis`]).

use std::collections::HashMap;

use sha2::{Digest as _, Sha256};
use shared::schema::{TextAnalysis, TextPayload};

use crate::stage::{Chain, Stage, StageError, decode};

/// How many words `top_words` holds at most.
pub const TOP_WORDS: usize = 5;

/// The full chain for `text.analyze`.
#[must_use]
pub fn chain() -> impl Chain<Input = crate::stage::Payload, Output = TextAnalysis> {
    decode::<TextPayload>().then(Analyze).then(Digest)
}

/// Counts of a text, before its digest is added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Number of whitespace-separated tokens.
    pub words: u64,
    /// Number of Unicode scalar values.
    pub chars: u64,
    /// Number of lines.
    pub lines: u64,
    /// The most frequent normalized words, by count descending then word ascending.
    pub top_words: Vec<(String, u64)>,
}

/// The text together with its counts: what [`Analyze`] hands to [`Digest`].
#[derive(Debug, Clone)]
pub struct Analyzed {
    /// The original text, kept for the digest.
    pub text: String,
    /// Its counts.
    pub counts: Counts,
}

/// Counts words, characters, lines and the most frequent words.
#[derive(Debug, Clone, Copy)]
pub struct Analyze;

impl Stage for Analyze {
    type Input = TextPayload;
    type Output = Analyzed;

    fn name(&self) -> &'static str {
        "analyze"
    }

    async fn run(&self, input: TextPayload) -> Result<Analyzed, StageError> {
        let counts = count(&input.text);
        Ok(Analyzed {
            text: input.text,
            counts,
        })
    }
}

/// Adds the SHA-256 of the text and produces the final output.
#[derive(Debug, Clone, Copy)]
pub struct Digest;

impl Stage for Digest {
    type Input = Analyzed;
    type Output = TextAnalysis;

    fn name(&self) -> &'static str {
        "digest"
    }

    async fn run(&self, input: Analyzed) -> Result<TextAnalysis, StageError> {
        let Counts {
            words,
            chars,
            lines,
            top_words,
        } = input.counts;
        Ok(TextAnalysis {
            words,
            chars,
            lines,
            top_words,
            sha256: sha256_hex(&input.text),
        })
    }
}

/// Word, character and line counts and the [`TOP_WORDS`] most frequent words of `text`.
///
/// Words for `top_words` are lowercased, stripped of leading and trailing non-alphanumeric
/// characters, and dropped when that leaves nothing.
#[must_use]
pub fn count(text: &str) -> Counts {
    let mut words = 0u64;
    let mut freq: HashMap<String, u64> = HashMap::new();
    for token in text.split_whitespace() {
        words += 1;
        let trimmed = token.trim_matches(|c: char| !c.is_alphanumeric());
        if trimmed.is_empty() {
            continue;
        }
        *freq.entry(trimmed.to_lowercase()).or_insert(0) += 1;
    }
    let mut top_words: Vec<(String, u64)> = freq.into_iter().collect();
    top_words.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top_words.truncate(TOP_WORDS);
    Counts {
        words,
        chars: text.chars().count() as u64,
        lines: text.lines().count() as u64,
        top_words,
    }
}

/// Lowercase hex SHA-256 of the UTF-8 bytes of `text`.
#[must_use]
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_words_chars_and_lines() {
        let c = count("Hello, world!\nhello   WORLD.\n\n¡Olé!");
        assert_eq!(c.words, 5);
        assert_eq!(c.chars, 35);
        assert_eq!(c.lines, 4);
        assert_eq!(
            c.top_words,
            [
                ("hello".to_owned(), 2),
                ("world".to_owned(), 2),
                ("olé".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn top_words_breaks_ties_alphabetically_and_keeps_five() {
        let c = count("f e d c b a a -- ...");
        assert_eq!(c.words, 9);
        let words: Vec<_> = c.top_words.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(words, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn empty_text() {
        let c = count("");
        assert_eq!((c.words, c.chars, c.lines), (0, 0, 0));
        assert!(c.top_words.is_empty());
    }

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
