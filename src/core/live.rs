//! Settings the core reads on every message, replaceable while running (SIGHUP).

use std::collections::HashMap;

use super::Access;
use crate::chat::Platform;
use crate::config::{SamplingSettings, Settings};

#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub sampling: SamplingSettings,
    pub access: HashMap<Platform, Access>,
}

impl CoreConfig {
    pub fn from_settings(s: &Settings) -> Self {
        let access = Platform::ALL
            .into_iter()
            .map(|p| {
                let rules = match p {
                    Platform::Console => Access::open(),
                    Platform::Discord => Access::new(s.discord.access.clone()),
                    Platform::Matrix => Access::new(s.matrix.access.clone()),
                };
                (p, rules)
            })
            .collect();
        Self {
            sampling: s.sampling.clone(),
            access,
        }
    }

    pub fn access(&self, platform: Platform) -> Access {
        self.access
            .get(&platform)
            .cloned()
            .unwrap_or_else(Access::closed)
    }
}
