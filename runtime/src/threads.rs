//! The worker pool the forward pass runs on (rayon's global pool).

use std::sync::atomic::{AtomicBool, Ordering};

/// Sets the worker count once per process (later calls keep the first setting).
pub fn set_global_threads(threads: Option<usize>) {
    if let Some(t) = threads {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global();
    }
}

/// Runs `pass` on a pool thread, so each of its parallel sections starts and ends among workers
/// instead of waking the caller's thread. With `keep_hot`, the other workers keep looking for
/// work until it ends (see [`keep_workers_hot`]); otherwise they may sleep, leaving the cores to
/// other threads (the expert cache's I/O threads while a streamed pass waits for reads).
pub fn run_on_pool<R: Send>(keep_hot: bool, pass: impl FnOnce() -> R + Send) -> R {
    let stop = AtomicBool::new(false);
    let others = if keep_hot {
        rayon::current_num_threads() - 1
    } else {
        0
    };
    rayon::scope(|_| {
        let pass_thread = rayon::current_thread_index();
        let (result, ()) = rayon::join(
            || {
                let _stop = SetOnDrop(&stop);
                pass()
            },
            || keep_workers_hot(&stop, pass_thread, others),
        );
        result
    })
}

/// Sets its flag when dropped, also when unwinding (a spinning worker must always be released).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Occupies `count` workers of the pool with a task that runs pending work as soon as it
/// appears and spins in between, until `stop` is set. A decode step has about five parallel
/// sections per layer with a little serial work between them; a worker that fell asleep in
/// between has to be woken for the next one, which costs a VM's idle vCPU tens of microseconds
/// each time. Built from `join`s, whose jobs live on the stack: decoding still allocates
/// nothing.
fn keep_workers_hot(stop: &AtomicBool, pass_thread: Option<usize>, count: usize) {
    let spin = || {
        // The pass's own thread picks this up when nobody stole it (or while it waits in a
        // join): it must not spin there, or the pass would never finish.
        if rayon::current_thread_index() == pass_thread {
            return;
        }
        while !stop.load(Ordering::Acquire) {
            if let Some(rayon::Yield::Idle) = rayon::yield_now() {
                std::hint::spin_loop();
            }
        }
    };
    match count {
        0 => {}
        1 => spin(),
        _ => {
            rayon::join(spin, || keep_workers_hot(stop, pass_thread, count - 1));
        }
    }
}
