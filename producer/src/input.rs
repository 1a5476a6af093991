//! Where payloads come from: JSON lines from a file or stdin, or synthetic texts.
//!
//! Every line is checked to be JSON before it is sent; a bad line becomes an
//! [`InputError`] that is reported and counted as failed, never sent.

use std::path::{Path, PathBuf};

use serde_json::value::RawValue;
use shared::schema::TextPayload;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

/// A line of input that cannot be a payload.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The input could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The input path (`-` for stdin).
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not valid JSON.
    #[error("{}, line {line}: {reason}", path.display())]
    Line {
        /// The input path (`-` for stdin).
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// A stream of payloads, pulled one at a time.
pub enum Payloads {
    /// JSON lines.
    Lines {
        /// The input path, for messages.
        path: PathBuf,
        /// The reader.
        reader: Box<dyn AsyncBufRead + Unpin + Send>,
        /// Lines read so far.
        line: u64,
        /// Reused line buffer.
        buf: Vec<u8>,
    },
    /// Synthetic texts.
    Synthetic(Synthetic),
}

impl std::fmt::Debug for Payloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Lines { path, line, .. } => f
                .debug_struct("Lines")
                .field("path", path)
                .field("line", line)
                .finish(),
            Self::Synthetic(s) => s.fmt(f),
        }
    }
}

impl Payloads {
    /// Payloads read from `path` (stdin for `-`), one JSON value per line.
    ///
    /// # Errors
    /// Fails when the file cannot be opened.
    pub async fn from_path(path: &Path) -> Result<Self, InputError> {
        let reader: Box<dyn AsyncBufRead + Unpin + Send> = if path == Path::new("-") {
            Box::new(BufReader::new(tokio::io::stdin()))
        } else {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|source| InputError::Read {
                    path: path.to_owned(),
                    source,
                })?;
            Box::new(BufReader::new(file))
        };
        Ok(Self::Lines {
            path: path.to_owned(),
            reader,
            line: 0,
            buf: Vec::new(),
        })
    }

    /// `count` synthetic `text.analyze` payloads of about `size` bytes of text each.
    #[must_use]
    pub fn synthetic(count: u64, size: usize) -> Self {
        Self::Synthetic(Synthetic::new(count, size))
    }

    /// How many payloads there will be, when known in advance.
    #[must_use]
    pub fn len_hint(&self) -> Option<u64> {
        match self {
            Self::Lines { .. } => None,
            Self::Synthetic(s) => Some(s.count),
        }
    }

    /// The next payload, `None` at the end. Blank lines are skipped.
    pub async fn next(&mut self) -> Option<Result<Box<RawValue>, InputError>> {
        match self {
            Self::Synthetic(s) => s.next().map(Ok),
            Self::Lines {
                path,
                reader,
                line,
                buf,
            } => loop {
                buf.clear();
                match reader.read_until(b'\n', buf).await {
                    Ok(0) => return None,
                    Ok(_) => *line += 1,
                    Err(source) => {
                        return Some(Err(InputError::Read {
                            path: path.clone(),
                            source,
                        }));
                    }
                }
                let text = match std::str::from_utf8(buf) {
                    Ok(text) => text.trim(),
                    Err(e) => {
                        let reason = format!("not valid UTF-8 (byte {})", e.valid_up_to());
                        return Some(Err(InputError::Line {
                            path: path.clone(),
                            line: *line,
                            reason,
                        }));
                    }
                };
                if text.is_empty() {
                    continue;
                }
                return Some(serde_json::from_str::<Box<RawValue>>(text).map_err(|e| {
                    // serde_json says "at line 1 column N" of the one line it saw: keep only
                    // the column, so the file's line number is the only one.
                    let said = e.to_string();
                    let what = said
                        .rsplit_once(" at line ")
                        .map_or(said.as_str(), |(w, _)| w);
                    InputError::Line {
                        path: path.clone(),
                        line: *line,
                        reason: format!("invalid JSON at column {}: {what}", e.column()),
                    }
                }));
            },
        }
    }
}

/// Generator of pseudo-random English-like texts, deterministic per run.
#[derive(Debug)]
pub struct Synthetic {
    count: u64,
    size: usize,
    sent: u64,
    state: u64,
}

const WORDS: &[&str] = &[
    "the", "queue", "worker", "broker", "message", "stage", "chain", "async", "rust", "job",
    "result", "confirm", "ack", "retry", "Consumer", "producer", "fast", "safe", "never", "lost",
    "data", "flow", "bounded", "channel", "and", "of", "to", "in", "a", "is",
];

impl Synthetic {
    fn new(count: u64, size: usize) -> Self {
        let seed = u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
        Self {
            count,
            size,
            sent: 0,
            state: seed | 1,
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64: plenty for varied test texts, no dependency.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn text(&mut self) -> String {
        let mut text = String::with_capacity(self.size + 16);
        let mut on_line = 0;
        while text.len() < self.size {
            let word = WORDS[(self.rand() % WORDS.len() as u64) as usize];
            text.push_str(word);
            on_line += 1;
            match self.rand() % 16 {
                0 => text.push_str(". "),
                1 if on_line > 6 => {
                    text.push('\n');
                    on_line = 0;
                }
                2 => text.push_str(", "),
                _ => text.push(' '),
            }
        }
        text.truncate(self.size);
        text
    }

    fn next(&mut self) -> Option<Box<RawValue>> {
        if self.sent >= self.count {
            return None;
        }
        self.sent += 1;
        let payload = TextPayload { text: self.text() };
        serde_json::value::to_raw_value(&payload).ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn synthetic_payloads_have_the_requested_count_and_size() {
        let mut p = Payloads::synthetic(3, 100);
        let mut n = 0;
        while let Some(payload) = p.next().await {
            let payload: TextPayload = serde_json::from_str(payload.unwrap().get()).unwrap();
            assert_eq!(payload.text.len(), 100);
            n += 1;
        }
        assert_eq!(n, 3);
    }

    #[tokio::test]
    async fn lines_are_checked_one_by_one() {
        let path = std::env::temp_dir().join(format!("producer-input-{}", std::process::id()));
        std::fs::write(&path, b"{\"text\":\"a\"}\n\n{oops\n[1]\n\xff\n").unwrap();
        let mut p = Payloads::from_path(&path).await.unwrap();
        assert_eq!(p.next().await.unwrap().unwrap().get(), r#"{"text":"a"}"#);
        let err = p.next().await.unwrap().unwrap_err().to_string();
        assert!(
            err.ends_with(", line 3: invalid JSON at column 2: key must be a string"),
            "{err}"
        );
        assert!(
            !err.contains("line 1"),
            "one line number, the file's: {err}"
        );
        assert_eq!(p.next().await.unwrap().unwrap().get(), "[1]");
        let err = p.next().await.unwrap().unwrap_err().to_string();
        assert!(err.contains(", line 5: not valid UTF-8"), "{err}");
        assert!(p.next().await.is_none());
        std::fs::remove_file(path).unwrap();
    }
}
