//! The one owner of how long an error text may be.
//!
//! Every reason that leaves a process (`x-error`, a `failed` result's `error`, a log line, an
//! HTTP answer) may echo input: serde quotes the string it could not read, a URL parser quotes
//! the URL. A 200 KB string quoted into `x-error` overflows the broker's frame size and kills
//! the connection. So every such text is built through [`Reason::new`] (or [`bounded`]), which
//! keeps at most [`REASON_BUDGET`] bytes and says that it cut the rest, without ever holding
//! more than the budget in memory: the text is formatted into a writer that stops storing at
//! the budget and only counts what follows.

use std::fmt::{self, Write};

/// Most bytes of an error text kept, before the marker that says it was cut.
pub const REASON_BUDGET: usize = 1024;

/// Longest [`Reason`], marker included: a budget of bytes plus the marker's own length.
pub const REASON_MAX_LEN: usize = REASON_BUDGET + 64;

/// An error text bounded to [`REASON_MAX_LEN`] bytes; cheap to clone into a header, a result
/// and a log line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Reason(String);

impl Reason {
    /// Formats `text`, keeping at most [`REASON_BUDGET`] bytes (cut at a character boundary)
    /// and appending `… [cut: N bytes in all]` when there was more.
    pub fn new(text: impl fmt::Display) -> Self {
        Self(bounded(text))
    }

    /// The text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, owned.
    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }

    /// This reason followed by `more`, the whole bounded again.
    #[must_use]
    pub fn with(self, more: impl fmt::Display) -> Self {
        Self::new(format_args!("{}{more}", self.0))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Reason> for String {
    fn from(reason: Reason) -> Self {
        reason.0
    }
}

impl AsRef<str> for Reason {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// `text` formatted and cut to [`REASON_BUDGET`] bytes, with a marker when cut: the function
/// behind [`Reason::new`], for callers that want a plain `String`.
#[must_use]
pub fn bounded(text: impl fmt::Display) -> String {
    let mut writer = Bounded::default();
    // Our writer never fails; a Display impl that does leaves what was written so far.
    let _ = write!(writer, "{text}");
    let Bounded {
        mut kept,
        total,
        cut,
    } = writer;
    if cut {
        let _ = write!(kept, "… [cut: {total} bytes in all]");
    }
    kept
}

/// Keeps the first [`REASON_BUDGET`] bytes written, counts the rest.
#[derive(Default)]
struct Bounded {
    kept: String,
    total: usize,
    /// Once a piece was cut, nothing later is kept: the text stays a prefix of the whole.
    cut: bool,
}

impl Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.total = self.total.saturating_add(s.len());
        if self.cut {
            return Ok(());
        }
        let room = REASON_BUDGET.saturating_sub(self.kept.len());
        if s.len() <= room {
            self.kept.push_str(s);
            return Ok(());
        }
        let mut end = room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.kept.push_str(&s[..end]);
        self.cut = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_texts_are_kept_whole() {
        assert_eq!(bounded("unknown kind"), "unknown kind");
        assert_eq!(Reason::new(format_args!("{} {}", "a", 1)).as_str(), "a 1");
    }

    #[test]
    fn long_texts_are_cut_with_a_marker() {
        let huge = "x".repeat(300_000);
        let reason = Reason::new(format_args!("invalid payload: {huge:?}"));
        assert!(
            reason.as_str().len() <= REASON_MAX_LEN,
            "{}",
            reason.as_str().len()
        );
        assert!(reason.as_str().starts_with("invalid payload: \"xxx"));
        assert!(
            reason.as_str().ends_with("[cut: 300019 bytes in all]"),
            "{reason}"
        );
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        let text = "é".repeat(REASON_BUDGET);
        let reason = bounded(&text);
        assert!(reason.len() <= REASON_MAX_LEN);
        assert!(reason.starts_with("éé"));
    }

    #[test]
    fn nothing_after_a_cut_piece_is_kept() {
        let long = "y".repeat(REASON_BUDGET + 10);
        let reason = bounded(format_args!("{long}{}", "tail"));
        assert!(!reason.contains("tail"));
        assert!(reason.ends_with(&format!("[cut: {} bytes in all]", REASON_BUDGET + 14)));
    }

    #[test]
    fn with_appends_and_bounds_again() {
        let reason = Reason::new("a").with("; b");
        assert_eq!(reason.as_str(), "a; b");
        let long = Reason::new("z".repeat(REASON_BUDGET)).with("x".repeat(5000));
        assert!(long.as_str().len() <= REASON_MAX_LEN);
    }
}
