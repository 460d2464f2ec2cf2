//! Continuing a sequence from a kept prefix (prompt caching) computes exactly what evaluating
//! the whole prompt does: a session rewound to a shared prefix (for a recurrent model, the
//! snapshot taken there), or swapped to another kept conversation, gives the same logits as a
//! fresh one.

use moe_e2e::{Fixture, FIXTURES};
use moe_runtime::gguf::GgmlType;
use moe_runtime::model::{KvType, Model, Session};

fn fresh(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut s = Session::with_kv_type(model, 64, KvType::F16);
    s.forward(ids, true).expect("forward").to_vec()
}

/// Two prompts sharing their first half: the second, evaluated after rewinding to the shared
/// prefix, matches a fresh evaluation bit for bit; a third conversation swapped in and out in
/// between does not disturb either.
#[test]
fn rewound_and_swapped_sequences_match_fresh_ones() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::Q8_0);
        let file = conv.open();
        let model = Model::load(&file).expect("model loads");
        let vocab = model.hp.n_vocab as u32;
        let ids = |seed: u32, n: usize| -> Vec<u32> {
            (0..n as u32)
                .map(|i| (i * 7919 + seed * 104_729 + 13) % vocab)
                .collect()
        };
        let a = ids(1, 12);
        let mut b = a[..6].to_vec();
        b.extend(ids(2, 5));
        let other = ids(3, 9);

        let mut s = Session::with_kv_type(&model, 64, KvType::F16);
        // A snapshot at the shared prefix: what a recurrent state (lfm2_moe) can go back to.
        s.forward(&a[..6], false).unwrap();
        s.snapshot();
        s.forward(&a[6..], false).unwrap();
        assert_eq!(
            s.can_rewind(5),
            !s.has_recurrent_state(),
            "{name}: only KV caches go back anywhere"
        );
        // Another conversation runs in between, swapped in and out.
        let mut kept = s.blank_sequence();
        s.swap_sequence(&mut kept);
        assert_eq!(s.position(), 0);
        let other_logits = s.forward(&other, true).unwrap().to_vec();
        assert_eq!(
            other_logits,
            fresh(&model, &other),
            "{name}: swapped-in sequence"
        );
        s.swap_sequence(&mut kept);
        assert_eq!((s.position(), kept.position()), (a.len(), other.len()));

        s.rewind(6).unwrap();
        let got = s.forward(&b[6..], true).unwrap().to_vec();
        let want = fresh(&model, &b);
        let rows = b.len() - 6;
        assert_eq!(
            got,
            want[want.len() - rows * vocab as usize..],
            "{name}: logits after rewinding to the shared prefix"
        );
        assert!(
            s.rewind(b.len() + 1).is_err(),
            "{name}: cannot rewind forward"
        );
    }
}
