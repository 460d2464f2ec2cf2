//! Mixture-of-experts: routing, running experts over a batch, and the bounded expert cache that
//! streams experts from flash.

pub mod cache;
pub mod calib;
pub mod decoupled;
pub mod experts;
pub mod gru;
pub mod lossy;
pub mod predictor;
pub mod replay;
pub mod router;
