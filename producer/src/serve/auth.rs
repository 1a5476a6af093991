//! Who may call `producer serve`: bearer tokens from `--tokens` (`PRODUCER_TOKENS`) and/or a
//! file, one token per line (`--tokens-file`), which is read again when it changes, so tokens
//! rotate without a restart. With no token configured at all, the server only listens on
//! 127.0.0.1 (see [`super::start`]).

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How often the tokens file is checked for changes, at most.
const RECHECK: Duration = Duration::from_secs(1);
/// How soon a file seen changed is read again: its new tokens are taken only once two reads
/// agree, so that a file being rewritten in place is never taken half-written.
const SETTLE: Duration = Duration::from_millis(100);
/// Largest tokens file read; a larger one is refused (fail closed).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Tokens shorter than this are refused at start: a guessable token is no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// The accepted bearer tokens.
#[derive(Debug)]
pub struct Tokens {
    fixed: Vec<String>,
    file: Option<PathBuf>,
    loaded: Mutex<Loaded>,
}

/// What the tokens file gave, and what it is turning into.
#[derive(Debug)]
struct Loaded {
    checked: Option<Instant>,
    /// What the file was when last taken (two reads agreeing).
    taken: Option<Seen>,
    /// What one read found that differs from `taken`, waiting for a second read to agree.
    pending: Option<Seen>,
    /// The tokens admitted now. While new content is pending, only those also in it (a token
    /// removed is refused at once; one added waits for the file to settle). Once a broken
    /// file is taken, none.
    tokens: Vec<String>,
    /// Why the file is refused, once it is (no token at all is then accepted).
    broken: Option<String>,
}

/// One read of the tokens file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Its text, every line valid.
    Text(String),
    /// Why it cannot be used: missing, unreadable, too large, an invalid line.
    Broken(String),
}

/// Why the tokens cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The tokens file cannot be read.
    #[error("cannot read the tokens file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The tokens file is larger than anyone's tokens.
    #[error("the tokens file {path} is over {MAX_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A token is too short.
    #[error("a token is shorter than {MIN_TOKEN_LEN} characters")]
    TooShort,
}

impl Tokens {
    /// Tokens from a list and an optional file; the file is read now, so a missing file is an
    /// error at start rather than a server that refuses everyone.
    ///
    /// # Errors
    /// See [`TokensError`].
    pub fn new(fixed: &[String], file: Option<PathBuf>) -> Result<Self, TokensError> {
        let fixed: Vec<String> = fixed
            .iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        if fixed.iter().any(|t| t.len() < MIN_TOKEN_LEN) {
            return Err(TokensError::TooShort);
        }
        let tokens = Self {
            fixed,
            file,
            loaded: Mutex::new(Loaded {
                checked: None,
                taken: None,
                pending: None,
                tokens: Vec::new(),
                broken: None,
            }),
        };
        if let Some(path) = &tokens.file {
            let text = read_file(path)?;
            let parsed = parse(&text)?;
            let mut loaded = tokens.lock();
            loaded.tokens = parsed;
            loaded.taken = Some(Seen::Text(text));
            loaded.checked = Some(Instant::now());
        }
        Ok(tokens)
    }

    /// Whether any token is configured (a file counts, even an empty one).
    #[must_use]
    pub fn configured(&self) -> bool {
        !self.fixed.is_empty() || self.file.is_some()
    }

    /// Whether an `Authorization` header value carries an accepted bearer token. With a tokens
    /// file that cannot be read or holds an invalid line, no token is accepted, not even those
    /// of `--tokens`: a broken file fails closed.
    #[must_use]
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        let Some(offered) = authorization.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let offered = offered.trim().as_bytes();
        let Some(path) = &self.file else {
            return self.fixed.iter().any(|t| same(t.as_bytes(), offered));
        };
        let mut loaded = self.lock();
        let due = if loaded.pending.is_some() {
            SETTLE
        } else {
            RECHECK
        };
        if loaded.checked.is_none_or(|t| t.elapsed() >= due) {
            loaded.checked = Some(Instant::now());
            loaded.refresh(path);
        }
        if loaded.broken.is_some() {
            return false;
        }
        self.fixed.iter().any(|t| same(t.as_bytes(), offered))
            || loaded.tokens.iter().any(|t| same(t.as_bytes(), offered))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Loaded {
    /// Reads the file again and moves towards what it says now: a state (new tokens, or a
    /// broken file) is taken once two reads in a row agree, so that neither a file caught
    /// half-written nor one failed read decides; a token no longer in the file is refused at
    /// the first read that misses it.
    fn refresh(&mut self, path: &PathBuf) {
        let (seen, parsed) = match read_file(path).and_then(|text| {
            let tokens = parse(&text)?;
            Ok((text, tokens))
        }) {
            Ok((text, tokens)) => (Seen::Text(text), Some(tokens)),
            Err(error) => (Seen::Broken(error.to_string()), None),
        };
        if self.taken.as_ref() == Some(&seen) {
            // Unchanged, or back to what was taken before a change that did not settle.
            if let Some(tokens) = parsed {
                self.tokens = tokens;
            }
            self.pending = None;
            return;
        }
        if self.pending.as_ref() == Some(&seen) {
            match (&seen, parsed) {
                (Seen::Text(_), Some(tokens)) => {
                    tracing::info!(tokens = tokens.len(), "tokens file changed; reloaded");
                    self.tokens = tokens;
                    self.broken = None;
                }
                (Seen::Broken(error), _) | (Seen::Text(error), None) => {
                    tracing::error!(%error, "the tokens file is refused: no token is accepted until it is fixed");
                    self.tokens.clear();
                    self.broken = Some(error.clone());
                }
            }
            self.taken = Some(seen);
            self.pending = None;
            return;
        }
        if let Some(tokens) = &parsed {
            self.tokens.retain(|t| tokens.contains(t));
        }
        self.pending = Some(seen);
    }
}

/// The file's text, bounded.
fn read_file(path: &PathBuf) -> Result<String, TokensError> {
    use std::io::Read as _;
    let read = |source| TokensError::Read {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(TokensError::TooLarge { path: path.clone() });
    }
    Ok(text)
}

/// The tokens of a file's text: one a line, `#` starts a comment.
fn parse(text: &str) -> Result<Vec<String>, TokensError> {
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if tokens.iter().any(|t| t.len() < MIN_TOKEN_LEN) {
        return Err(TokensError::TooShort);
    }
    Ok(tokens)
}

/// Compares in time that depends on the lengths only, not on where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const T1: &str = "0123456789abcdef-one";
    const T2: &str = "0123456789abcdef-two";

    #[test]
    fn fixed_tokens_are_checked() {
        let tokens = Tokens::new(&[T1.to_owned()], None).unwrap();
        assert!(tokens.configured());
        assert!(tokens.allows(Some(&format!("Bearer {T1}"))));
        assert!(!tokens.allows(Some(&format!("Bearer {T2}"))));
        assert!(!tokens.allows(Some(T1)));
        assert!(!tokens.allows(None));
        assert!(Tokens::new(&["short".to_owned()], None).is_err());
        assert!(!Tokens::new(&[], None).unwrap().configured());
    }

    /// Waits past the next check of the tokens file and the one that settles it, then asks.
    fn after_check(tokens: &Tokens, token: &str) -> bool {
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        let _ = tokens.allows(Some(&format!("Bearer {token}")));
        std::thread::sleep(SETTLE + Duration::from_millis(50));
        tokens.allows(Some(&format!("Bearer {token}")))
    }

    #[test]
    fn a_tokens_file_is_read_again_when_it_changes() {
        let path = std::env::temp_dir().join(format!("tokens-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, format!("# comment\n{T1}\n")).unwrap();
        let tokens = Tokens::new(&[], Some(path.clone())).unwrap();
        assert!(tokens.allows(Some(&format!("Bearer {T1}"))));
        // Rewritten in place with the same length and, on coarse filesystems, the same
        // modification time: the content decides, not the metadata.
        std::fs::write(&path, format!("# comment\n{T2}\n")).unwrap();
        assert!(after_check(&tokens, T2));
        assert!(!tokens.allows(Some(&format!("Bearer {T1}"))));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_removed_token_is_refused_at_the_first_check_an_added_one_once_the_file_settles() {
        let path = std::env::temp_dir().join(format!("tokens-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, format!("{T1}\n{T2}\n")).unwrap();
        let tokens = Tokens::new(&[], Some(path.clone())).unwrap();
        std::fs::write(&path, format!("{T2}\n")).unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(
            !tokens.allows(Some(&format!("Bearer {T1}"))),
            "revoked at once"
        );
        assert!(tokens.allows(Some(&format!("Bearer {T2}"))));
        // Half of a new token written: never taken as a token of its own.
        std::fs::write(&path, format!("{T2}\n{}", &T1[..T1.len() - 1])).unwrap();
        assert!(tokens.allows(Some(&format!("Bearer {T2}"))));
        assert!(!tokens.allows(Some(&format!("Bearer {T1}"))));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_deleted_emptied_or_invalid_tokens_file_fails_closed() {
        let path = std::env::temp_dir().join(format!("tokens-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, format!("{T1}\n")).unwrap();
        let tokens = Tokens::new(&[T2.to_owned()], Some(path.clone())).unwrap();
        assert!(tokens.allows(Some(&format!("Bearer {T1}"))));

        std::fs::remove_file(&path).unwrap();
        assert!(
            !after_check(&tokens, T1),
            "deleted: the file's tokens refused"
        );
        assert!(
            !tokens.allows(Some(&format!("Bearer {T2}"))),
            "and --tokens too"
        );

        std::fs::write(&path, format!("{T1}\n")).unwrap();
        assert!(after_check(&tokens, T1), "restored: admitted again");

        std::fs::write(&path, "").unwrap();
        assert!(!after_check(&tokens, T1), "emptied");
        // Emptied, then back before the empty file settled: admitted again.
        std::fs::write(&path, format!("{T1}\n")).unwrap();
        assert!(after_check(&tokens, T1), "restored");
        std::fs::write(&path, "").unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(
            !tokens.allows(Some(&format!("Bearer {T1}"))),
            "refused at once"
        );
        std::fs::write(&path, format!("{T1}\n")).unwrap();
        assert!(after_check(&tokens, T1), "back to what was taken");

        std::fs::write(&path, format!("{T1}\nshort\n")).unwrap();
        assert!(!after_check(&tokens, T1), "an invalid line");
        assert!(!tokens.allows(Some(&format!("Bearer {T2}"))));

        std::fs::write(&path, vec![b'a'; 2 * 1024 * 1024]).unwrap();
        assert!(!after_check(&tokens, T1), "too large");
        std::fs::remove_file(&path).unwrap();
    }
}
