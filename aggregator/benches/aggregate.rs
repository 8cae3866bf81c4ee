//! Aggregation and transport benchmark (placeholder until written).
fn main() {}
