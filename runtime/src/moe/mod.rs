//! Mixture-of-experts routing and expert execution.

pub mod experts;
pub mod router;
