//! Writes the seed corpora of the fuzz targets: one file per seed message, named by the
//! message's kind and position, under `<dir>/<target>/` (default `<dir>` is `fuzz/corpus`).
//!
//! `cargo run -p protocol --example fuzz_seeds -- fuzz/corpus`

use std::path::PathBuf;

use protocol::fuzzing::seed_messages;
use protocol::{encode_frame, FRAME_HEADER_BYTES};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let frames = seed_messages()
        .iter()
        .map(|m| Ok((m.kind(), encode_frame(m)?)))
        .collect::<Result<Vec<_>, protocol::CodecError>>()?;
    let mut written = 0;
    for target in ["frame_decoder", "decode_validate", "round_trip"] {
        let out = dir.join(target);
        std::fs::create_dir_all(&out)?;
        for (i, (kind, frame)) in frames.iter().enumerate() {
            // The stream target reads whole frames, the others frame bodies.
            let bytes = if target == "frame_decoder" {
                frame.as_slice()
            } else {
                &frame[FRAME_HEADER_BYTES..]
            };
            std::fs::write(out.join(format!("seed-{i:02}-{kind}")), bytes)?;
            written += 1;
        }
        if target == "frame_decoder" {
            // Two frames back to back, and a frame cut short.
            let mut two = frames[0].1.clone();
            two.extend_from_slice(&frames[5].1);
            std::fs::write(out.join("seed-stream-two-frames"), &two)?;
            let cut = &frames[5].1[..frames[5].1.len() / 2];
            std::fs::write(out.join("seed-stream-truncated"), cut)?;
            written += 2;
        }
    }
    println!("wrote {written} seed files under {}", dir.display());
    Ok(())
}
