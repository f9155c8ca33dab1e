//! Alerts: what a thing's `[thing.alert]` declares, and the condition engine that judges a
//! dweet against it. Shared by config checks, the lifecycle and the sandbox, so it sits below
//! all of them.

pub mod condition;

use serde::Deserialize;

use crate::client::Alert;

/// A thing's `[thing.alert]`: who is told, and the JavaScript condition.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSpec {
    pub to: Vec<String>,
    pub when: String,
}

impl AlertSpec {
    /// Same recipients (in any order) and the very same condition.
    pub fn matches(&self, alert: &Alert) -> bool {
        let mut wanted: Vec<&str> = self.to.iter().map(String::as_str).collect();
        let mut actual: Vec<&str> = alert
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect();
        wanted.sort_unstable();
        actual.sort_unstable();
        wanted == actual && self.when == alert.condition
    }
}
