//! SVIDs: the X509-SVID, JWT-SVID and WIT-SVID documents that carry a SPIFFE ID, and their
//! validators (public API: the SDK and the transaction token service reuse them).

pub mod jwt;
pub mod wit;
pub mod x509;
