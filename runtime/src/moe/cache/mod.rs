//! A bounded RAM cache of routed experts, filled from the model file by I/O threads.
//!
//! Each slot holds one expert of one layer (its gate, up and down slabs, each read with one
//! page-aligned read). The compute thread asks for the experts a layer actually routed to; a
//! missing one is read at once, ahead of any speculative read, and each expert is handed out as
//! soon as it is loaded, so the present ones are computed while the missing ones are read (the
//! compute thread waits only when nothing it asked for is ready: a "stall", counted and timed).
//! Predictors ask for experts they expect soon; such a speculative read only takes a slot whose
//! expert is predicted later (or not at all) and is not more frequently used, and the bytes of
//! speculative reads in flight are capped, so prefetching never displaces what is about to be
//! used nor delays a demand read for long.
//!
//! The cache and its requests (demand, speculative, kept resident): `expert_cache`; handing
//! experts out: `arrivals`; where experts are in the file: `layout`; slot state and memory:
//! `slots`; what to evict: `policy`; reading: `io` and `flash`; what the threads share: `state`;
//! sizing from a memory budget: `budget`; the offline optimum: `offline`.

mod arrivals;
mod budget;
mod error;
mod expert_cache;
pub mod flash;
mod io;
mod layout;
mod offline;
mod policy;
mod slots;
mod state;
mod stats;
#[cfg(test)]
mod tests;

pub use arrivals::{Arrivals, ExpertGuard};
pub use budget::{advise_resident_only, plan_budget, BudgetPlan, RUNTIME_OVERHEAD};
pub use error::CacheError;
pub use expert_cache::{CacheConfig, ExpertCache};
pub use layout::{ExpertKey, ExpertLayout, SlabSpec};
pub use offline::{optimal_misses, optimal_reads};
pub use policy::Eviction;
pub use stats::CacheStats;
