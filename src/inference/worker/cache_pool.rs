//! Attention caches kept between a conversation's turns, within one byte budget.

use std::collections::HashMap;

use crate::inference::model::SeqCache;

/// Attention caches of recent conversations, evicted least-recently-used over a byte budget.
pub(super) struct CachePool {
    entries: HashMap<String, (SeqCache, u64)>,
    tick: u64,
    budget: u64,
}

impl CachePool {
    pub(super) fn new(budget: u64) -> Self {
        Self {
            entries: HashMap::new(),
            tick: 0,
            budget,
        }
    }

    pub(super) fn take(&mut self, conv: &str) -> Option<SeqCache> {
        self.entries.remove(conv).map(|(c, _)| c)
    }

    /// Keeps a finished conversation's cache; `in_use` is what running sequences hold, which
    /// counts against the same budget.
    pub(super) fn put(&mut self, conv: String, cache: SeqCache, in_use: u64) {
        if cache.is_empty() || cache.bytes() as u64 + in_use > self.budget {
            return;
        }
        self.tick += 1;
        self.entries.insert(conv, (cache, self.tick));
        while self.used() + in_use > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            tracing::debug!(conversation = %oldest, "evicting attention cache");
            self.entries.remove(&oldest);
        }
    }

    pub(super) fn used(&self) -> u64 {
        self.entries.values().map(|(c, _)| c.bytes() as u64).sum()
    }
}
