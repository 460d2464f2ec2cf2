//! Optional changes to the model's routing that trade a little quality for fewer expert reads,
//! all off by default. They post-process a [`Route`] (or mask router logits before routing), so
//! the routing functions themselves stay untouched.
//!
//! - Dynamic top-p: keep the fewest of the top-k experts whose share of the selected router mass
//!   reaches `p`.
//! - Skip uncached: drop a routed expert that is not in the expert cache when its routing weight
//!   is below a threshold (never the token's best expert).
//! - Masking (calibration and tests): experts whose router logit is set to -inf, exactly as if
//!   their router rows had been removed.
//!
//! When the model renormalises its top-k weights, the kept weights are rescaled to the mass the
//! route had before trimming, as if the model had been routed to fewer experts to begin with.

use serde::Serialize;

use super::router::Route;

/// The lossy routing options of a session.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RouteOptions {
    /// Dynamic top-p routing threshold (None = off).
    pub top_p: Option<f32>,
    /// Skip a routed expert missing from the expert cache when its weight is below this
    /// (None = off; no effect without an expert cache).
    pub skip_uncached_below: Option<f32>,
}

impl RouteOptions {
    pub fn is_off(&self) -> bool {
        self.top_p.is_none() && self.skip_uncached_below.is_none()
    }
}

/// What the lossy options did over a session.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LossyStats {
    /// Expert selections the model's router made (token x expert).
    pub routed: u64,
    /// Selections dropped by dynamic top-p.
    pub dropped_top_p: u64,
    /// Selections dropped because the expert was not cached and its weight was low.
    pub skipped_uncached: u64,
    /// Sum over tokens of the router weight share the dropped selections carried.
    pub dropped_mass: f64,
}

/// Sets the logits of masked experts (`masked[e]`) to -inf.
pub fn mask_logits(logits: &mut [f32], masked: &[bool]) {
    for (v, &m) in logits.iter_mut().zip(masked) {
        if m {
            *v = f32::NEG_INFINITY;
        }
    }
}

/// Keeps the entries of `r` for which `keep(rank, expert, share)` holds, where `share` is the
/// weight's share of the route's total; returns (dropped count, dropped share).
fn retain(
    r: &mut Route,
    renormalize: bool,
    mut keep: impl FnMut(usize, u32, f32, f32) -> bool,
) -> (u64, f32) {
    let total: f32 = r.weights.iter().sum();
    if total <= 0.0 {
        return (0, 0.0);
    }
    let mut out = Route::default();
    let mut cum = 0f32;
    for (i, (&e, &w)) in r.experts.iter().zip(&r.weights).enumerate() {
        let share = w / total;
        if keep(i, e, share, cum) {
            let _ = out.experts.push(e);
            let _ = out.weights.push(w);
        }
        cum += share;
    }
    let dropped = (r.experts.len() - out.experts.len()) as u64;
    let kept: f32 = out.weights.iter().sum();
    let dropped_share = 1.0 - kept / total;
    if renormalize && dropped > 0 {
        out.weights.iter_mut().for_each(|w| *w *= total / kept);
    }
    *r = out;
    (dropped, dropped_share)
}

/// Dynamic top-p: keeps the best experts until their share of the route's weight reaches `p`
/// (always at least one).
pub fn trim_top_p(r: &mut Route, p: f32, renormalize: bool) -> (u64, f32) {
    retain(r, renormalize, |i, _, _, cum_before| {
        i == 0 || cum_before < p
    })
}

/// Drops experts with share below `w` for which `cached(e)` is false (never the best one).
pub fn skip_uncached(
    r: &mut Route,
    w: f32,
    renormalize: bool,
    cached: impl Fn(u32) -> bool,
) -> (u64, f32) {
    retain(r, renormalize, |i, e, share, _| {
        i == 0 || share >= w || cached(e)
    })
}

/// Applies the options to one token's route, counting what they did.
pub fn apply(
    opts: &RouteOptions,
    r: &mut Route,
    renormalize: bool,
    cached: impl Fn(u32) -> bool,
    stats: &mut LossyStats,
) {
    stats.routed += r.experts.len() as u64;
    if let Some(p) = opts.top_p {
        let (n, share) = trim_top_p(r, p, renormalize);
        stats.dropped_top_p += n;
        stats.dropped_mass += share as f64;
    }
    if let Some(w) = opts.skip_uncached_below {
        // The share is of the route as top-p left it (exact when top-p is off).
        let (n, share) = skip_uncached(r, w, renormalize, cached);
        stats.skipped_uncached += n;
        stats.dropped_mass += share as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::router::route;

    #[test]
    fn top_p_keeps_fewest_reaching_p() {
        // Probabilities 0.5, 0.3, 0.15, 0.05 after renormalisation.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let mut r = route(&logits, 4, true);
        let (n, share) = trim_top_p(&mut r, 0.75, true);
        assert_eq!(&r.experts[..], &[0, 1]);
        assert_eq!(n, 2);
        assert!((share - 0.2).abs() < 1e-5);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((r.weights[0] - 0.625).abs() < 1e-5);
        // p = 1 keeps everything; a tiny p keeps the best only.
        let mut r = route(&logits, 4, true);
        assert_eq!(trim_top_p(&mut r, 1.0, true).0, 0);
        let mut r = route(&logits, 4, false);
        trim_top_p(&mut r, 0.01, false);
        assert_eq!(&r.experts[..], &[0]);
        assert!((r.weights[0] - 0.5).abs() < 1e-6, "not renormalised");
    }

    #[test]
    fn skip_uncached_never_drops_best_or_cached() {
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let mut r = route(&logits, 4, true);
        let (n, _) = skip_uncached(&mut r, 0.9, true, |e| e == 2);
        assert_eq!(&r.experts[..], &[0, 2]);
        assert_eq!(n, 2);
        let mut r = route(&logits, 4, true);
        skip_uncached(&mut r, 0.1, true, |_| false);
        assert_eq!(&r.experts[..], &[0, 1, 2]);
    }

    #[test]
    fn masking_equals_removing_rows() {
        let logits = [1.0f32, 3.0, 2.0, 0.5, 2.5];
        let mut masked = logits;
        mask_logits(&mut masked, &[false, true, false, false, false]);
        let a = route(&masked, 2, true);
        let b = route(&[1.0, 2.0, 0.5, 2.5], 2, true);
        assert_eq!(&a.experts[..], &[4, 2]);
        assert_eq!(&b.experts[..], &[3, 1]);
        assert_eq!(a.weights, b.weights);
    }
}
