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
        let live_held = self.live.len().min(session.position());
        let live_shared = shared_prefix(&self.live[..live_held], prompt);
        let best_kept = self
            .kept
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let held = k.ids.len().min(k.seq.position());
                (shared_prefix(&k.ids[..held], prompt), i)
            })
            .max();
        if let Some((shared, i)) = best_kept {
            if shared > live_shared {
                // An earlier conversation continues: it and the live one change places.
                let k = &mut self.kept[i];
                session.swap_sequence(&mut k.seq);
                std::mem::swap(&mut self.live, &mut k.ids);
                k.last_used = self.clock;
            }
        }
        let held = self.live.len().min(session.position());
        let shared = shared_prefix(&self.live[..held], prompt);
        if self.capacity > 0 && held > 0 && 2 * shared < held {
            self.keep_live_aside(session);
        }
        let held = self.live.len().min(session.position());
        let mut keep = shared_prefix(&self.live[..held], prompt).min(prompt.len() - 1);
        if !session.can_rewind(keep) {
            keep = 0;
        }
        session
            .rewind(keep)
            .expect("rewinding to a checked position");
        self.live.truncate(keep);
        keep
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
