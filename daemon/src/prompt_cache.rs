//! Prompt-prefix reuse, as the llama.cpp server's `cache_prompt`: the session keeps the KV cache
//! of the conversation it served last, and a bounded number of earlier conversations are kept
//! beside it (least recently used evicted). A new request continues from the longest prefix of
//! its prompt that one of them holds, so a multi-turn chat evaluates only the new turn.

use moe_runtime::model::{SavedSequence, Session};

/// A conversation swapped out of the session.
struct Kept {
    seq: SavedSequence,
    /// The ids at its positions.
    ids: Vec<u32>,
    last_used: u64,
}

pub struct PromptCache {
    /// Conversations kept besides the session's own (each holds a whole KV cache).
    capacity: usize,
    kept: Vec<Kept>,
    /// The ids at the session's positions.
    live: Vec<u32>,
    clock: u64,
}

impl PromptCache {
    /// Keeps `conversations` in all, the session's own included (0 and 1: only the session's).
    pub fn new(conversations: usize) -> Self {
        Self {
            capacity: conversations.saturating_sub(1),
            kept: Vec::new(),
            live: Vec::new(),
            clock: 0,
        }
    }

    /// Puts into the session the conversation sharing the longest prefix with `prompt` and cuts
    /// it back to that prefix (at most all but the prompt's last id, whose logits are needed);
    /// returns how many prompt ids the session now holds. A prompt that shares less than half
    /// of the best conversation is a new conversation: with room to keep more than one, it
    /// starts afresh and the others stay intact (as the llama.cpp server's slot similarity).
    pub fn prepare(&mut self, session: &mut Session, prompt: &[u32]) -> usize {
        self.clock += 1;
        let last = prompt.len() - 1;
        // What a conversation offers is the longest shared prefix it can be cut back to: all of
        // it with KV caches only; with recurrent layers, the current position, the snapshot's
        // (before the last prompt's final id) or nothing.
        let live_reuse = self.reusable(session, prompt);
        let best_kept = self
            .kept
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let held = k.ids.len().min(k.seq.position());
                let shared = shared_prefix(&k.ids[..held], prompt).min(last);
                (k.seq.rewind_point(shared), i)
            })
            .max();
        if let Some((reuse, i)) = best_kept {
            if reuse > live_reuse {
                // An earlier conversation continues: it and the live one change places.
                let k = &mut self.kept[i];
                session.swap_sequence(&mut k.seq);
                std::mem::swap(&mut self.live, &mut k.ids);
                k.last_used = self.clock;
            }
        }
        let held = self.live.len().min(session.position());
        if self.capacity > 0 && held > 0 && 2 * self.reusable(session, prompt) < held {
            self.keep_live_aside(session);
        }
        let keep = self.reusable(session, prompt);
        session
            .rewind(keep)
            .expect("rewinding to a position the session offered");
        self.live.truncate(keep);
        keep
    }

    /// How many of `prompt`'s ids the session's conversation can keep.
    fn reusable(&self, session: &Session, prompt: &[u32]) -> usize {
        let held = self.live.len().min(session.position());
        let shared = shared_prefix(&self.live[..held], prompt).min(prompt.len() - 1);
        session.rewind_point(shared)
    }

    /// Moves the live conversation into a kept place (a new one while there is room, else the
    /// least recently used one's, which is forgotten) and leaves the session empty.
    fn keep_live_aside(&mut self, session: &mut Session) {
        if self.kept.len() < self.capacity {
            self.kept.push(Kept {
                seq: session.blank_sequence(),
                ids: Vec::new(),
                last_used: 0,
            });
        }
        let lru = (0..self.kept.len())
            .min_by_key(|&i| self.kept[i].last_used)
            .expect("at least one place");
        let k = &mut self.kept[lru];
        session.swap_sequence(&mut k.seq);
        std::mem::swap(&mut self.live, &mut k.ids);
        k.last_used = self.clock;
        self.live.clear();
        session.reset();
    }

    /// Records what the session holds after serving `prompt` and generating `generated`: the
    /// ids of its positions (the last generated id was never evaluated).
    pub fn finish(&mut self, session: &Session, prompt: &[u32], generated: &[u32]) {
        self.live.clear();
        self.live.extend_from_slice(prompt);
        self.live.extend_from_slice(generated);
        self.live.truncate(session.position());
    }

    /// Forgets every conversation (after a failure, nothing cached is trusted).
    pub fn clear(&mut self, session: &mut Session) {
        self.live.clear();
        self.kept.clear();
        session.reset();
    }
}

fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use moe_runtime::engine::{generate, Request};
    use moe_runtime::gguf::{GgmlType, GgufFile};
    use moe_runtime::model::{KvType, Model, Session};
    use moe_runtime::sampling::{Sampler, SamplerConfig};

    use super::PromptCache;

    /// The tiny LFM2-MoE of tests/fixtures (short convolutions beside attention), converted.
    fn lfm2_file() -> (tempfile::TempDir, GgufFile) {
        let src =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lfm2_moe");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lfm2.gguf");
        let opts = moe_convert::ConvertOptions::new(GgmlType::F32);
        moe_convert::convert(&src, &path, &opts, &|_, _, _| {}).unwrap();
        let file = GgufFile::open(&path).unwrap();
        (dir, file)
    }

    /// Serves `prompt` as the worker does: the cache prepares the session, the runtime's loop
    /// generates greedily. Returns how many ids were reused and the generated ids.
    fn serve(pc: &mut PromptCache, s: &mut Session, prompt: &[u32]) -> (usize, Vec<u32>) {
        let cached = pc.prepare(s, prompt);
        let mut sampler = Sampler::new(SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        });
        let req = Request {
            prompt,
            cached,
            max_tokens: 4,
            stop: &[],
            ignore_eos: true,
            skip_special: false,
            top_logprobs: None,
            constraint: None,
        };
        let mut generated = Vec::new();
        generate(s, &mut sampler, None, &req, |p| {
            generated.extend(p.id);
            true
        })
        .unwrap();
        pc.finish(s, prompt, &generated);
        (cached, generated)
    }

    fn greedy_fresh(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut fresh = Session::with_kv_type(model, 64, KvType::F32);
        let mut out = Vec::new();
        let mut logits = fresh.forward(prompt, false).unwrap().to_vec();
        for _ in 0..n {
            let next = moe_runtime::sampling::argmax_logits(&logits);
            out.push(next);
            logits = fresh.forward(&[next], false).unwrap().to_vec();
        }
        out
    }

    /// With recurrent layers the cache reuses only what the state can go back to (the whole
    /// held sequence, or the snapshot before the last prompt's final id), and every reply is
    /// the one a fresh session gives.
    #[test]
    fn recurrent_models_reuse_only_exact_points() {
        let (_dir, file) = lfm2_file();
        let model = Model::load(&file).unwrap();
        let mut s = Session::with_kv_type(&model, 64, KvType::F32);
        assert!(s.has_recurrent_state());
        let mut pc = PromptCache::new(2);
        let p1: Vec<u32> = (0..10).map(|i| (i * 37 + 11) % 384).collect();

        let (cached, g1) = serve(&mut pc, &mut s, &p1);
        assert_eq!(cached, 0);
        assert_eq!(g1, greedy_fresh(&model, &p1, 4));

        // The next turn continues the held sequence exactly: all of it is reused.
        let mut p2 = p1.clone();
        p2.extend_from_slice(&g1);
        p2.extend_from_slice(&[5, 6, 7]);
        let (cached, g2) = serve(&mut pc, &mut s, &p2);
        assert_eq!(
            cached,
            p1.len() + g1.len() - 1,
            "everything the session held"
        );
        assert_eq!(g2, greedy_fresh(&model, &p2, 4));

        // The same prompt again (a regenerated reply): back to the snapshot before its last id.
        let (cached, again) = serve(&mut pc, &mut s, &p2);
        assert_eq!(cached, p2.len() - 1, "the snapshot");
        assert_eq!(again, g2);

        // A prompt that leaves the held sequence in its middle: the state cannot go back
        // there, so the prompt is evaluated from the start (the other conversation is kept).
        let mut p3 = p2[..p2.len() - 2].to_vec();
        p3.push(9);
        let (cached, g3) = serve(&mut pc, &mut s, &p3);
        assert_eq!(cached, 0);
        assert_eq!(g3, greedy_fresh(&model, &p3, 4));

        // p2's conversation was kept aside with its snapshot: a regeneration swaps it back.
        let (cached, again) = serve(&mut pc, &mut s, &p2);
        assert_eq!(cached, p2.len() - 1);
        assert_eq!(again, g2);
    }
}
