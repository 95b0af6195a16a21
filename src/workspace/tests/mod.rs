//! Module-level adversarial tests.
