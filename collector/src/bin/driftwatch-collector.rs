//! Placeholder until the storage backend lands.
fn main() {}
