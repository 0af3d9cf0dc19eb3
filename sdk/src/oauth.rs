//! The OAuth vocabulary of RFC 8693 token exchange, in one place for the transaction
//! token service and its clients: the grant type, the token types a subject token may
//! have, the `token_type` of an issued Txn-Token, and the JWT-SVID client assertion
//! type. Available without any feature.
//!
//! ```
//! use writ_sdk::oauth::TokenType;
//!
//! let t: TokenType = "urn:ietf:params:oauth:token-type:access_token".parse()?;
//! assert_eq!(t, TokenType::AccessToken);
//! assert_eq!(t.name(), "access_token");
//! assert_eq!(TokenType::from_name("txn_token"), Some(TokenType::TxnToken));
//! # Ok::<(), writ_sdk::oauth::UnknownTokenType>(())
//! ```

use std::fmt;
use std::str::FromStr;

/// The RFC 8693 token exchange grant type (`grant_type`).
pub const GRANT_TYPE_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The `token_type` of an issued Txn-Token: not an access token (RFC 8693 section 2.2.1).
pub const TOKEN_TYPE_N_A: &str = "N_A";
/// The client assertion type of a JWT-SVID (draft-ietf-oauth-spiffe-client-auth).
pub const CLIENT_ASSERTION_TYPE_JWT_SPIFFE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe";

/// The URN prefix every RFC 8693 token type shares.
const TOKEN_TYPE_PREFIX: &str = "urn:ietf:params:oauth:token-type:";

/// An RFC 8693 token type the transaction token service handles: the kinds of subject
/// token it accepts, and the Txn-Token it issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TokenType {
    /// `urn:ietf:params:oauth:token-type:access_token`: an OAuth access token.
    AccessToken,
    /// `urn:ietf:params:oauth:token-type:id_token`: an OpenID Connect ID token.
    IdToken,
    /// `urn:ietf:params:oauth:token-type:jwt`: another JWT.
    Jwt,
    /// `urn:ietf:params:oauth:token-type:txn_token`: a Txn-Token.
    TxnToken,
    /// `urn:ietf:params:oauth:token-type:self_signed`: a JWT the requesting workload
    /// signed itself (draft-ietf-oauth-transaction-tokens, "Self-Signed Subject Token
    /// Type").
    SelfSigned,
    /// `urn:ietf:params:oauth:token-type:unsigned_json`: an unsigned JSON object naming
    /// the subject (draft-ietf-oauth-transaction-tokens, "Unsigned JSON Object Subject
    /// Token Type").
    UnsignedJson,
}

impl TokenType {
    /// Every token type, in declaration order.
    pub const ALL: [Self; 6] = [
        Self::AccessToken,
        Self::IdToken,
        Self::Jwt,
        Self::TxnToken,
        Self::SelfSigned,
        Self::UnsignedJson,
    ];

    /// The RFC 8693 URN of this token type, as it travels in `subject_token_type` and
    /// `issued_token_type`.
    pub const fn as_urn(self) -> &'static str {
        match self {
            Self::AccessToken => "urn:ietf:params:oauth:token-type:access_token",
            Self::IdToken => "urn:ietf:params:oauth:token-type:id_token",
            Self::Jwt => "urn:ietf:params:oauth:token-type:jwt",
            Self::TxnToken => "urn:ietf:params:oauth:token-type:txn_token",
            Self::SelfSigned => "urn:ietf:params:oauth:token-type:self_signed",
            Self::UnsignedJson => "urn:ietf:params:oauth:token-type:unsigned_json",
        }
    }

    /// The short name: the URN's last part (`access_token`), as policy files and the
    /// command line write it.
    pub fn name(self) -> &'static str {
        self.as_urn()
            .strip_prefix(TOKEN_TYPE_PREFIX)
            .unwrap_or_else(|| self.as_urn())
    }

    /// The token type named by an RFC 8693 URN, if it is one of these.
    pub fn from_urn(urn: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_urn() == urn)
    }

    /// The token type of a short name (`access_token`, `id_token`, `jwt`, `txn_token`,
    /// `self_signed`, `unsigned_json`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for TokenType {
    /// The URN.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_urn())
    }
}

/// A text that is neither the URN nor the short name of a [`TokenType`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown token type `{0}`")]
pub struct UnknownTokenType(pub String);

impl FromStr for TokenType {
    type Err = UnknownTokenType;

    /// The token type of a URN or a short name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_urn(s)
            .or_else(|| Self::from_name(s))
            .ok_or_else(|| UnknownTokenType(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urns_and_names_round_trip() {
        for t in TokenType::ALL {
            assert_eq!(TokenType::from_urn(t.as_urn()), Some(t));
            assert_eq!(TokenType::from_name(t.name()), Some(t));
            assert_eq!(t.to_string().parse::<TokenType>(), Ok(t));
            assert_eq!(t.name().parse::<TokenType>(), Ok(t));
            assert_eq!(format!("{TOKEN_TYPE_PREFIX}{}", t.name()), t.as_urn());
        }
        assert_eq!(
            TokenType::from_name("unsigned_json"),
            Some(TokenType::UnsignedJson)
        );
        assert_eq!(
            TokenType::SelfSigned.as_urn(),
            "urn:ietf:params:oauth:token-type:self_signed"
        );
        // Refresh tokens are never a subject token (draft-ietf-oauth-transaction-tokens).
        assert_eq!(TokenType::from_name("refresh_token"), None);
        assert_eq!(
            TokenType::from_urn("urn:ietf:params:oauth:token-type:saml2"),
            None
        );
        assert!("".parse::<TokenType>().is_err());
        // The wire strings, spelled out.
        assert_eq!(
            TokenType::TxnToken.as_urn(),
            "urn:ietf:params:oauth:token-type:txn_token"
        );
        assert_eq!(
            GRANT_TYPE_TOKEN_EXCHANGE,
            "urn:ietf:params:oauth:grant-type:token-exchange"
        );
    }
}
