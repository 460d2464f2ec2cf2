//! Token sampling with the usual llama.cpp chain: repetition penalty, top-k, top-p, min-p,
//! temperature, then a draw from a seeded generator. Temperature 0 is greedy.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// llama.cpp's defaults.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: ChaCha8Rng,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Self {
            cfg,
            rng,
            candidates: Vec::new(),
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Picks the next token from `logits` given the tokens so far (for the penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let cfg = &self.cfg;
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if cfg.repeat_penalty != 1.0 && cfg.repeat_last_n > 0 {
            let recent = &history[history.len().saturating_sub(cfg.repeat_last_n)..];
            // A token repeated several times is penalised once, as in llama.cpp.
            let mut seen = std::collections::HashSet::with_capacity(recent.len());
            for &t in recent.iter().filter(|t| seen.insert(**t)) {
                if let Some(e) = c.get_mut(t as usize) {
                    // Like llama.cpp and transformers: shrink positive logits, grow negative ones.
                    if e.1 > 0.0 {
                        e.1 /= cfg.repeat_penalty;
                    } else {
                        e.1 *= cfg.repeat_penalty;
                    }
                }
            }
        }
        if cfg.temperature <= 0.0 {
            return argmax(c);
        }
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if cfg.top_k > 0 && cfg.top_k < c.len() {
            c.truncate(cfg.top_k);
        }
        // Probabilities at temperature 1 for the top-p and min-p cuts, as llama.cpp orders them.
        let max = c[0].1;
        let mut probs: Vec<f32> = c.iter().map(|&(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if cfg.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = c.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            probs.truncate(keep);
        }
        if cfg.min_p > 0.0 {
            let floor = probs[0] * cfg.min_p;
            let keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
            c.truncate(keep);
        }
        let weights: Vec<f32> = c
            .iter()
            .map(|&(_, l)| ((l - max) / cfg.temperature).exp())
            .collect();
        let total: f32 = weights.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (&(tok, _), w) in c.iter().zip(&weights) {
            if r < *w {
                return tok;
            }
            r -= w;
        }
        c.last().map(|&(t, _)| t).unwrap_or(0)
    }
}

/// Index of the largest logit; the lowest index wins ties (like torch.argmax).
pub fn argmax_logits(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn argmax(c: &[(u32, f32)]) -> u32 {
    let mut best = 0;
    for (i, e) in c.iter().enumerate() {
        if e.1 > c[best].1 {
            best = i;
        }
    }
    c[best].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[]), 1);
        // Penalising token 1 makes 2 the greedy choice.
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            repeat_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[1]), 2);
        let draw = |seed| {
            let mut s = Sampler::new(SamplerConfig {
                seed,
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                ..Default::default()
            });
            (0..32).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // top-k 1 is greedy whatever the temperature.
        let mut s = Sampler::new(SamplerConfig {
            top_k: 1,
            temperature: 5.0,
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&logits, &[]) == 1));
    }
}
