//! Sizing the cache from a memory budget, and keeping the streamed experts out of the page cache.

use std::collections::HashSet;

use super::error::CacheError;
use super::layout::ExpertLayout;
use crate::gguf::GgufFile;

/// Cache slots that fit a memory budget after the resident part of the model.
pub struct BudgetPlan {
    pub slots: usize,
    pub resident_bytes: usize,
    pub overhead_bytes: usize,
}

/// Fixed overhead reserved from a budget for code, thread stacks, the allocator and small
/// buffers: twice what the whole process takes on the bundled model (docs/STREAMING.md). The
/// forward pass's batch scratch grows with the model and is budgeted with the KV cache.
pub const RUNTIME_OVERHEAD: usize = 16 << 20;

/// Splits `budget` bytes: the non-expert tensors of `file`, and `state_bytes` (the KV cache and
/// the forward pass's batch scratch) stay resident, the rest becomes expert slots for `layout`;
/// at least `experts_per_token` slots must fit.
pub fn plan_budget(
    file: &GgufFile,
    layout: &ExpertLayout,
    experts_per_token: usize,
    state_bytes: usize,
    budget: usize,
) -> Result<BudgetPlan, CacheError> {
    let slot_bytes = layout.slot_bytes();
    let file_tensors = file.header().tensor_data_bytes();
    let resident = file_tensors.saturating_sub(layout.total_expert_bytes()) + state_bytes;
    let one_token = experts_per_token * slot_bytes;
    let need_min = resident + RUNTIME_OVERHEAD + one_token;
    if budget < need_min {
        return Err(CacheError::Budget(format!(
            "a memory budget of {} MiB is too small: the resident part (non-expert weights, \
             KV cache and prompt-batch scratch) takes {} MiB, the runtime {} MiB, and one \
             token's experts {} MiB; give at least {} MiB",
            budget >> 20,
            resident >> 20,
            RUNTIME_OVERHEAD >> 20,
            one_token >> 20,
            need_min.div_ceil(1 << 20)
        )));
    }
    Ok(BudgetPlan {
        slots: (budget - resident - RUNTIME_OVERHEAD) / slot_bytes.max(1),
        resident_bytes: resident,
        overhead_bytes: RUNTIME_OVERHEAD,
    })
}

/// Once experts stream through the cache, the file's map serves only the resident tensors: the
/// map gets no readahead (with a device readahead of megabytes, each page fault would pull
/// neighbouring expert bytes into the page cache, which counts against a cgroup's limit; see
/// docs/BENCHMARKS.md), and the resident tensors are read ahead at once instead.
pub fn advise_resident_only(file: &GgufFile, layout: &ExpertLayout) {
    // Stacked tensors start with expert 0's slab; per-expert tensors are one slab each.
    let expert_starts: HashSet<u64> = layout.slab_offsets().collect();
    file.advise(memmap2::Advice::Random, None);
    for t in file.header().tensors() {
        if !expert_starts.contains(&(t.range.start as u64)) {
            file.advise(memmap2::Advice::WillNeed, Some(t.range.clone()));
        }
    }
}
