//! Quick probe: time LoRA training steps on the real model (arg: "ckpt" or "plain").
use burn::tensor::Device;
use device_agent::{assets, lora::Adapter, prune::KeptIndicesExt, train::*, weights};
use protocol::KeptIndices;
fn main() {
    if std::env::args().all(|a| a != "default-malloc") {
        device_agent::backend::tune_allocator();
    }
    let ckpt = std::env::args().nth(1).as_deref() != Some("plain");
    let (base, tok) = weights::load(&assets::default_model().unwrap(), &Device::flex()).unwrap();
    let text = device_agent::data::moby_dick_chapter(3).unwrap().text;
    let ids = tok.encode(&text).unwrap();
    let wins: Vec<Vec<u32>> = ids.chunks(257).take(4).map(|c| c.to_vec()).collect();
    let batch = Batch::lm(&wins);
    let ad = Adapter::new(&base.config, 16, 32.0, 0, &base.device);
    let cfg = TrainConfig {
        checkpointing: ckpt,
        ..TrainConfig::default()
    };
    let mut t = Tuner::new(&base, KeptIndices::dense(&base.config), ad, cfg).unwrap();
    for i in 0..3 {
        let t0 = std::time::Instant::now();
        let r = t.train_micro(&batch, 1e-3, i > 0).unwrap();
        println!(
            "ckpt={ckpt} step {i}: loss {:.4} {:.2}s",
            r.loss,
            t0.elapsed().as_secs_f64()
        );
    }
}
