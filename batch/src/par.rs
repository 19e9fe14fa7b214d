//! Parallel helpers shared by the batch and speed layers.

/// Maps `f` over `items` on every core, in contiguous chunks, keeping the order. Inputs of
/// fewer than `alone` items stay on this thread.
pub fn par_map<T: Send, R: Send>(items: Vec<T>, alone: usize, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 || items.len() < alone.max(2) {
        return items.into_iter().map(f).collect();
    }
    let per = items.len().div_ceil(cores);
    let mut chunks: Vec<Vec<T>> = Vec::with_capacity(cores);
    let mut items = items.into_iter();
    loop {
        let chunk: Vec<T> = items.by_ref().take(per).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push(chunk);
    }
    let f = &f;
    let total = chunks.iter().map(Vec::len).sum();
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || chunk.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        // Sized up front: growing a vector of a whole batch's results by doubling copies it
        // several times and touches fresh pages each time.
        let mut out = Vec::with_capacity(total);
        for h in handles {
            out.extend(h.join().expect("workers do not panic"));
        }
        out
    })
}
