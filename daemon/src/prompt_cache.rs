//! Prompt-prefix reuse, as the llama.cpp server's `cache_prompt`: conversations served before
//! keep their KV caches, and a new request continues from the longest prefix of its prompt that
//! one of them holds, so a multi-turn chat evaluates only the new turn.
//!
//! Every sequence lives here between requests: a request takes one (its conversation) for as
//! long as it is served, in a slot of `--parallel`, and gives it back at the end. At most
//! max(`--prompt-cache`, `--parallel`) sequences exist, each a whole KV cache: one per slot made
//! at start-up, more when first needed; idle ones are the conversations on offer (with
//! `--prompt-cache 0` none is reused).

use moe_runtime::model::{SavedSequence, Session};

/// A sequence and the ids at its positions.
pub struct Conversation {
    pub seq: SavedSequence,
    ids: Vec<u32>,
    last_used: u64,
}

pub struct PromptCache {
    /// Conversations not being served.
    idle: Vec<Conversation>,
    /// Sequences that exist (idle or being served), and at most.
    count: usize,
    limit: usize,
    /// Whether idle conversations are reused (`--prompt-cache` > 0).
    reuse: bool,
    clock: u64,
}

impl PromptCache {
    /// Keeps `conversations` for reuse (0: none) while serving up to `slots` at once. The
    /// session's own sequence becomes the first conversation: the session then holds none
    /// between requests, only the one whose prompt it evaluates.
    /// The slots' sequences are made now, so that memory for all of them is taken at start-up
    /// (conversations kept beyond them are made when first needed).
    pub fn new(conversations: usize, slots: usize, session: &mut Session) -> Self {
        let slots = slots.max(1);
        let mut idle = Vec::with_capacity(conversations.max(slots));
        idle.push(session.take_sequence());
        idle.extend((1..slots).map(|_| session.blank_sequence()));
        Self {
            idle: idle
                .into_iter()
                .map(|seq| Conversation {
                    seq,
                    ids: Vec::new(),
                    last_used: 0,
                })
                .collect(),
            count: slots,
            limit: conversations.max(slots),
            reuse: conversations > 0,
            clock: 0,
        }
    }

    /// Sequences that may exist at once (each a whole KV cache; the memory budget counts them).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Puts into the session the idle conversation sharing the longest prefix with `prompt`
    /// and cuts it back to that prefix (at most all but the prompt's last id, whose logits are
    /// needed); returns what the session held before (to be swapped back once the prompt is
    /// evaluated, see [`Conversation::seq`]) and how many prompt ids the session now holds. A
    /// prompt that shares less than half of the best conversation is a new conversation: with
    /// room for more than one, it starts afresh on a new sequence or the least recently used
    /// one, and the others stay intact (as the llama.cpp server's slot similarity). None when
    /// every sequence is being served (the caller admits at most `slots` requests).
    pub fn take(&mut self, session: &mut Session, prompt: &[u32]) -> Option<(Conversation, usize)> {
        self.clock += 1;
        let last = prompt.len() - 1;
        // What a conversation offers is the longest shared prefix it can be cut back to: all of
        // it with KV caches only; with recurrent layers, the current position, the snapshot's
        // (before the last prompt's final id) or nothing.
        let offer = |c: &Conversation| {
            let held = c.ids.len().min(c.seq.position());
            let shared = shared_prefix(&c.ids[..held], prompt).min(last);
            (c.seq.rewind_point(shared), held)
        };
        // The most recently used one among equals (the conversation served last).
        let best = self
            .idle
            .iter()
            .enumerate()
            .filter(|_| self.reuse)
            .map(|(i, c)| {
                let (reuse, held) = offer(c);
                ((reuse, c.last_used), held, i)
            })
            .max_by_key(|&(key, _, _)| key)
            .map(|((reuse, _), held, i)| (reuse, held, i));
        let fresh = |this: &mut Self| -> Option<(Conversation, usize)> {
            if this.count < this.limit {
                this.count += 1;
                let conv = Conversation {
                    seq: session.blank_sequence(),
                    ids: Vec::new(),
                    last_used: 0,
                };
                return Some((conv, 0));
            }
            let lru = (0..this.idle.len()).min_by_key(|&i| this.idle[i].last_used)?;
            Some((this.idle.swap_remove(lru), 0))
        };
        let (mut conv, keep) = match best {
            Some((reuse, held, i)) if !(self.limit > 1 && held > 0 && 2 * reuse < held) => {
                (self.idle.swap_remove(i), reuse)
            }
            _ => fresh(self)?,
        };
        conv.last_used = self.clock;
        session.swap_sequence(&mut conv.seq);
        session
            .rewind(keep)
            .expect("rewinding to a position the sequence offered");
        conv.ids.truncate(keep);
        Some((conv, keep))
    }

    /// Takes back a conversation after serving `prompt` and generating `generated` (its
    /// sequence swapped out of the session again): the ids of its positions (the last generated
    /// id was never evaluated).
    pub fn give_back(&mut self, mut conv: Conversation, prompt: &[u32], generated: &[u32]) {
        conv.ids.clear();
        conv.ids.extend_from_slice(prompt);
        conv.ids.extend_from_slice(generated);
        conv.ids.truncate(conv.seq.position());
        self.idle.push(conv);
    }

    /// Takes back a conversation whose state is not trusted (its request failed): it is not
    /// reused.
    pub fn give_back_forgotten(&mut self, mut conv: Conversation) {
        conv.ids.clear();
        self.idle.push(conv);
    }

    /// Forgets what every idle conversation holds (after a failure nothing cached is trusted).
    pub fn forget_all(&mut self) {
        self.idle.iter_mut().for_each(|c| c.ids.clear());
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
        let (mut conv, cached) = pc.take(s, prompt).expect("a free sequence");
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
        s.swap_sequence(&mut conv.seq);
        pc.give_back(conv, prompt, &generated);
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
        let mut pc = PromptCache::new(2, 1, &mut s);
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
