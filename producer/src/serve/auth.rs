//! Who may call `producer serve`: bearer tokens from `--tokens` (`PRODUCER_TOKENS`) and/or a
//! file, one token per line (`--tokens-file`), which is read again when it changes, so tokens
//! rotate without a restart. With no token configured at all, the server only listens on
//! 127.0.0.1 (see [`super::start`]).

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

/// How often the tokens file is checked for changes, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// Tokens shorter than this are refused at start: a guessable token is no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// The accepted bearer tokens.
#[derive(Debug)]
pub struct Tokens {
    fixed: Vec<String>,
    file: Option<PathBuf>,
    loaded: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    checked: Option<Instant>,
    modified: Option<SystemTime>,
    tokens: Vec<String>,
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
                modified: None,
                tokens: Vec::new(),
            }),
        };
        if let Some(path) = &tokens.file {
            let read = read_file(path)?;
            let mut loaded = tokens.lock();
            loaded.modified = read.0;
            loaded.tokens = read.1;
            loaded.checked = Some(Instant::now());
        }
        Ok(tokens)
    }

    /// Whether any token is configured (a file counts, even an empty one).
    #[must_use]
    pub fn configured(&self) -> bool {
        !self.fixed.is_empty() || self.file.is_some()
    }

    /// Whether an `Authorization` header value carries an accepted bearer token.
    #[must_use]
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        let Some(offered) = authorization.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let offered = offered.trim().as_bytes();
        if self.fixed.iter().any(|t| same(t.as_bytes(), offered)) {
            return true;
        }
        let Some(path) = &self.file else {
            return false;
        };
        let mut loaded = self.lock();
        if loaded.checked.is_none_or(|t| t.elapsed() >= RECHECK) {
            loaded.checked = Some(Instant::now());
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if modified != loaded.modified {
                match read_file(path) {
                    Ok((modified, tokens)) => {
                        tracing::info!(tokens = tokens.len(), "tokens file changed; reloaded");
                        loaded.modified = modified;
                        loaded.tokens = tokens;
                    }
                    Err(error) => tracing::warn!(%error, "keeping the previous tokens"),
                }
            }
        }
        loaded.tokens.iter().any(|t| same(t.as_bytes(), offered))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn read_file(path: &PathBuf) -> Result<(Option<SystemTime>, Vec<String>), TokensError> {
    let read = |source| TokensError::Read {
        path: path.clone(),
        source,
    };
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path).map_err(read)?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if tokens.iter().any(|t| t.len() < MIN_TOKEN_LEN) {
        return Err(TokensError::TooShort);
    }
    Ok((modified, tokens))
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

    #[test]
    fn a_tokens_file_is_read_again_when_it_changes() {
        let path = std::env::temp_dir().join(format!("tokens-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, format!("# comment\n{T1}\n")).unwrap();
        let tokens = Tokens::new(&[], Some(path.clone())).unwrap();
        assert!(tokens.allows(Some(&format!("Bearer {T1}"))));
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        std::fs::write(&path, format!("{T2}\n")).unwrap();
        // Some filesystems keep one-second mtimes: make sure this one looks changed.
        let later = SystemTime::now() + Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(tokens.allows(Some(&format!("Bearer {T2}"))));
        assert!(!tokens.allows(Some(&format!("Bearer {T1}"))));
        std::fs::remove_file(&path).unwrap();
    }
}
