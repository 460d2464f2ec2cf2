//! The generation loop shared by moe-run, the daemon and the tests.

use std::time::{Duration, Instant};

use crate::model::{ModelError, Session};
use crate::sampling::Sampler;

#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_time: Duration,
    pub generation_time: Duration,
    /// Why generation ended.
    pub stop: StopReason,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopReason {
    #[default]
    Length,
    EndOfGeneration,
    Cancelled,
}

/// Evaluates `prompt` then samples up to `max_new` tokens, calling `on_token` for each one;
/// `on_token` returns false to stop early. Tokens for which `is_end` is true stop generation
/// and are not passed on.
pub fn generate(
    session: &mut Session,
    sampler: &mut Sampler,
    prompt: &[u32],
    max_new: usize,
    is_end: impl Fn(u32) -> bool,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<GenerationStats, ModelError> {
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    if max_new == 0 {
        return Ok(stats);
    }
    let mut history = prompt.to_vec();
    let t0 = Instant::now();
    let mut logits = session.forward(prompt, false)?.to_vec();
    stats.prompt_time = t0.elapsed();
    let t1 = Instant::now();
    for i in 0..max_new {
        let next = sampler.sample(&logits, &history);
        if is_end(next) {
            stats.stop = StopReason::EndOfGeneration;
            break;
        }
        history.push(next);
        stats.generated_tokens += 1;
        if !on_token(next) {
            stats.stop = StopReason::Cancelled;
            break;
        }
        if i + 1 == max_new {
            break;
        }
        logits.clear();
        logits.extend_from_slice(session.forward(&[next], false)?);
    }
    stats.generation_time = t1.elapsed();
    Ok(stats)
}
