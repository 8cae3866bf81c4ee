//! Writes the seed corpus of the `aggregate` fuzz target: one file per seed input of
//! `aggregator::fuzzing::seed_inputs`, under `<dir>/aggregate/` (default `<dir>` is
//! `fuzz/corpus`).
//!
//! `cargo run -p aggregator --features fuzzing --example aggregate_fuzz_seeds -- fuzz/corpus`

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let out = dir.join("aggregate");
    std::fs::create_dir_all(&out)?;
    let seeds = aggregator::fuzzing::seed_inputs();
    for (name, bytes) in &seeds {
        std::fs::write(out.join(name), bytes)?;
    }
    println!("wrote {} seed files under {}", seeds.len(), out.display());
    Ok(())
}
