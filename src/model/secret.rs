//! Secret values as a type: key bytes, passphrases and job secrets live in
//! [`Secret`], whose `Debug` prints `[MASKED]` and whose bytes are zeroed on
//! drop, so nothing can log or leave them behind by accident.

use std::fmt;

use zeroize::Zeroizing;

/// What a masked value looks like wherever it would have appeared.
pub const MASK: &str = "[MASKED]";

/// Secret bytes (a private key, a passphrase, a secret variable's value).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(Zeroizing::new(bytes.into()))
    }

    /// The secret itself. Callers must not log or persist what they get.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The secret as UTF-8, when it is.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret::new(s.into_bytes())
    }
}

impl From<Vec<u8>> for Secret {
    fn from(v: Vec<u8>) -> Self {
        Secret::new(v)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::from("hunter2".to_string());
        assert_eq!(format!("{s:?} {s}"), "[MASKED] [MASKED]");
        assert_eq!(s.expose(), b"hunter2");
    }
}
