//! Fingerprints: what logs, audit records and caches carry instead of a secret. A token,
//! a join token or a certificate is named by its SHA-256, never printed in full.

use sha2::Digest;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

/// SHA-256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha256(data))
}

/// The fingerprint of a token (a JWT, a join token, an opaque access token): the hex
/// SHA-256 of its text. The one way Writ names a token in logs and audit records.
pub fn token(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_the_hex_sha256() {
        assert_eq!(
            token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_hex(b"abc"), token("abc"));
    }
}
