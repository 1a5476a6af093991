//! `text.analyze`: `decode -> analyze -> digest`.
//!
//! Input `{"text": "..."}`; output word, character and line counts, the five most frequent
//! words, and the SHA-256 of the text (see [`shared::schema::TextAnalysis`]).

use std::{borrow::Cow, collections::HashMap};

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
    // Most words are already lowercase ASCII: count them as borrowed slices of the text and
    // allocate only for the ones that need lowercasing. foldhash is randomly seeded per process,
    // so crafted texts cannot aim at its collisions, and is several times faster than SipHash on
    // short keys.
    let mut freq: foldhash::HashMap<Cow<'_, str>, u64> =
        HashMap::with_capacity_and_hasher(text.len() / 8, foldhash::fast::RandomState::default());
    for token in text.split_whitespace() {
        words += 1;
        let trimmed = token.trim_matches(|c: char| !c.is_alphanumeric());
        if trimmed.is_empty() {
            continue;
        }
        let word = if trimmed
            .bytes()
            .all(|b| b.is_ascii() && !b.is_ascii_uppercase())
        {
            Cow::Borrowed(trimmed)
        } else {
            Cow::Owned(trimmed.to_lowercase())
        };
        *freq.entry(word).or_insert(0) += 1;
    }
    let mut ranked: Vec<(Cow<'_, str>, u64)> = freq.into_iter().collect();
    let order = |a: &(Cow<'_, str>, u64), b: &(Cow<'_, str>, u64)| {
        b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0))
    };
    if ranked.len() > TOP_WORDS {
        ranked.select_nth_unstable_by(TOP_WORDS - 1, order);
        ranked.truncate(TOP_WORDS);
    }
    ranked.sort_unstable_by(order);
    Counts {
        words,
        chars: text.chars().count() as u64,
        lines: text.lines().count() as u64,
        top_words: ranked
            .into_iter()
            .map(|(word, n)| (word.into_owned(), n))
            .collect(),
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

    /// The plain definition `count` must agree with: every word lowercased, a full sort.
    fn top_words_by_definition(text: &str) -> Vec<(String, u64)> {
        let mut freq: HashMap<String, u64> = HashMap::new();
        for token in text.split_whitespace() {
            let trimmed = token.trim_matches(|c: char| !c.is_alphanumeric());
            if !trimmed.is_empty() {
                *freq.entry(trimmed.to_lowercase()).or_insert(0) += 1;
            }
        }
        let mut all: Vec<(String, u64)> = freq.into_iter().collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(TOP_WORDS);
        all
    }

    proptest::proptest! {
        #[test]
        fn top_words_match_the_definition(text in "([a-cA-CéÉİ.,!]{1,4}[ \n]{1,2}){0,40}") {
            proptest::prop_assert_eq!(count(&text).top_words, top_words_by_definition(&text));
        }
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
