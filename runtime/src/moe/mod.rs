//! Mixture-of-experts routing.

pub mod router;
