//! Backend selection at run time: names, backends not compiled in, the software-adapter policy,
//! and, with the `ndarray` or `wgpu` feature, the reference logits of the real model and a LoRA
//! step that agrees with flex (or, on a machine without a GPU, a clear `Unavailable` error).

use burn::tensor::Device;
use device_agent::backend::{
    admit_adapter, AdapterSummary, BackendError, BackendKind, ALLOW_SOFTWARE_GPU_ENV,
};

#[test]
fn unknown_backend_name_is_a_clear_error() {
    let err = "cuda".parse::<BackendKind>().unwrap_err();
    assert_eq!(err, BackendError::Unknown("cuda".into()));
    let msg = err.to_string();
    assert!(msg.contains("unknown backend 'cuda'"), "{msg}");
    for name in ["flex", "ndarray", "wgpu", "vulkan", "metal"] {
        assert!(msg.contains(name), "the message lists {name}: {msg}");
    }
}

#[test]
fn names_parse_back_to_their_backend() {
    for kind in BackendKind::ALL {
        assert_eq!(kind.name().parse::<BackendKind>().unwrap(), kind);
        assert_eq!(
            kind.to_string()
                .to_uppercase()
                .parse::<BackendKind>()
                .unwrap(),
            kind
        );
    }
    assert_eq!("cpu".parse::<BackendKind>().unwrap(), BackendKind::Flex);
    assert_eq!("gpu".parse::<BackendKind>().unwrap(), BackendKind::Wgpu);
}

#[test]
fn flex_is_always_compiled_and_starts() {
    assert!(BackendKind::Flex.is_compiled());
    assert_eq!(BackendKind::default(), BackendKind::Flex);
    assert_eq!(BackendKind::Flex.device().unwrap(), Device::flex());
}

#[test]
fn backends_not_compiled_in_name_their_feature() {
    let missing: Vec<BackendKind> = BackendKind::ALL
        .into_iter()
        .filter(|k| !k.is_compiled())
        .collect();
    for kind in &missing {
        let feature = kind
            .feature()
            .expect("only flex has no feature, and it is always compiled");
        let err = kind.device().unwrap_err();
        assert_eq!(
            err,
            BackendError::NotCompiled {
                backend: *kind,
                feature
            }
        );
        let msg = err.to_string();
        assert!(msg.contains(&format!("--features {feature}")), "{msg}");
        assert!(msg.contains("--backend flex"), "{msg}");
    }
    // The features this test binary was built with decide which backends are compiled in.
    assert_eq!(
        BackendKind::Ndarray.is_compiled(),
        cfg!(feature = "ndarray")
    );
    assert_eq!(BackendKind::Wgpu.is_compiled(), cfg!(feature = "wgpu"));
    assert_eq!(BackendKind::Vulkan.is_compiled(), cfg!(feature = "vulkan"));
    assert_eq!(BackendKind::Metal.is_compiled(), cfg!(feature = "metal"));
}

fn adapter(name: &str, api: &str, driver: &str, reported_cpu: bool) -> AdapterSummary {
    AdapterSummary {
        name: name.into(),
        api: api.into(),
        driver: driver.into(),
        reported_cpu,
    }
}

#[test]
fn software_adapters_are_refused_unless_allowed() {
    // Debian 12's Mesa: lavapipe on Vulkan reports a CPU device; llvmpipe on OpenGL may not.
    let lavapipe = adapter(
        "llvmpipe (LLVM 15.0.6, 256 bits)",
        "Vulkan",
        "llvmpipe Mesa 22.3.6",
        true,
    );
    let gl = adapter("llvmpipe (LLVM 15.0.6, 256 bits)", "Gl", "", false);
    let warp = adapter("Microsoft Basic Render Driver", "Dx12", "", false);
    for soft in [&lavapipe, &gl, &warp] {
        assert!(soft.is_software(), "{soft}");
        let why = admit_adapter(soft, false).unwrap_err();
        assert!(why.contains(&soft.name), "{why}");
        assert!(
            why.contains(&format!("{ALLOW_SOFTWARE_GPU_ENV}=1")),
            "{why}"
        );
        assert!(why.contains("matmul"), "{why}");
        assert_eq!(admit_adapter(soft, true), Ok(()));
    }
    let gpu = adapter(
        "NVIDIA GeForce RTX 3060",
        "Vulkan",
        "NVIDIA 535.183.01",
        false,
    );
    let jetson = adapter(
        "NVIDIA Tegra Orin (nvgpu)",
        "Vulkan",
        "NVIDIA 540.4.0",
        false,
    );
    let mali = adapter("Mali-G710", "Vulkan", "Mali", false);
    for hw in [&gpu, &jetson, &mali] {
        assert!(!hw.is_software(), "{hw}");
        assert_eq!(admit_adapter(hw, false), Ok(()));
    }
    // The reason reads as part of the `Unavailable` error, which names the fallback.
    let err = BackendError::Unavailable {
        backend: BackendKind::Vulkan,
        why: admit_adapter(&lavapipe, false).unwrap_err(),
    };
    let msg = err.to_string();
    assert!(msg.starts_with("backend 'vulkan' cannot start on this machine: the only adapter found is the software rasterizer"), "{msg}");
    assert!(
        msg.ends_with("Use `--backend flex` to run on the CPU"),
        "{msg}"
    );
}

#[cfg(any(feature = "ndarray", feature = "wgpu"))]
mod on_device {
    //! The real model and a LoRA step on a backend other than flex.

    use burn::tensor::Device;
    use device_agent::assets;
    use device_agent::lora::Adapter;
    use device_agent::model::{to_rows, Llama, ModelConfig};
    use device_agent::prune::KeptIndicesExt;
    use device_agent::train::{Batch, TrainConfig, Tuner};
    use device_agent::weights;
    use protocol::KeptIndices;

    #[derive(serde::Deserialize)]
    struct Top {
        id: u32,
        logit: f32,
    }

    #[derive(serde::Deserialize)]
    struct Reference {
        token_ids: Vec<u32>,
        top5_per_position: Vec<Vec<Top>>,
    }

    /// Max |ours - reference| over the reference's top-5 logits at every position of the
    /// reference prompt, on `device`; also checks that our top-1 is the reference's.
    pub fn max_reference_error(device: &Device) -> f32 {
        let r: Reference =
            serde_json::from_str(include_str!("data/smollm2-135m-instruct-fp32.json"))
                .expect("reference json");
        let path = assets::default_model().expect("default model in cache or fetchable");
        let (m, _) = weights::load(&path, device).expect("default model loads");
        let rows = to_rows(m.forward(m.tokens_tensor(std::slice::from_ref(&r.token_ids)), None));
        assert_eq!(rows.len(), r.top5_per_position.len());
        let mut worst = 0f32;
        for (row, tops) in rows.iter().zip(&r.top5_per_position) {
            for t in tops {
                worst = worst.max((row[t.id as usize] - t.logit).abs());
            }
            let best = row
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                .0;
            assert_eq!(best as u32, tops[0].id, "top-1 token");
        }
        worst
    }

    /// Two LoRA steps on a tiny random model (same weights on both devices): (loss, grad norm)
    /// per step and the logits with the trained adapter.
    fn tiny_tune(device: &Device) -> (Vec<(f64, f64)>, Vec<Vec<f32>>) {
        let cfg = ModelConfig::dense(64, 32, 2, 4, 2, 8, 48, true);
        let m = Llama::random(cfg, 9, device);
        let windows: Vec<Vec<u32>> = (0..2)
            .map(|b| (0..17).map(|t| ((t * 7 + b * 13) % 64) as u32).collect())
            .collect();
        let batch = Batch::lm(&windows);
        let ad = Adapter::new(&m.config, 4, 8.0, 9, device);
        let mut t = Tuner::new(
            &m,
            KeptIndices::dense(&m.config),
            ad,
            TrainConfig::default(),
        )
        .unwrap();
        let steps = (0..2)
            .map(|_| {
                let r = t
                    .train_micro(&batch, 1e-2, true)
                    .expect("one micro-batch per step");
                (r.loss, r.grad_norm)
            })
            .collect();
        let logits = to_rows(t.model.forward(m.tokens_tensor(&windows), Some(&t.adapter)));
        (steps, logits)
    }

    /// A LoRA step on `device` agrees with the same step on flex.
    pub fn assert_tuning_matches_flex(device: &Device) {
        let (ours, ours_logits) = tiny_tune(device);
        let (flex, flex_logits) = tiny_tune(&Device::flex());
        for ((l, g), (lf, gf)) in ours.iter().zip(&flex) {
            assert!((l - lf).abs() < 1e-3, "loss {l} vs flex {lf}");
            assert!(
                (g - gf).abs() < 1e-3 * gf.max(1.0),
                "grad norm {g} vs flex {gf}"
            );
        }
        let d = ours_logits
            .iter()
            .flatten()
            .zip(flex_logits.iter().flatten())
            .fold(0f32, |w, (a, b)| w.max((a - b).abs()));
        assert!(d < 1e-3, "logits after tuning differ from flex by {d}");
    }
}

#[cfg(feature = "ndarray")]
#[test]
fn ndarray_matches_the_reference_logits() {
    let device = BackendKind::Ndarray
        .device()
        .expect("ndarray is compiled in");
    let err = on_device::max_reference_error(&device);
    assert!(err < 0.05, "max top-5 logit error on ndarray: {err}");
}

#[cfg(feature = "ndarray")]
#[test]
fn ndarray_lora_steps_match_flex() {
    on_device::assert_tuning_matches_flex(&BackendKind::Ndarray.device().unwrap());
}

/// With a usable GPU: the reference logits and a LoRA step that matches flex. Without one (CI,
/// this machine): `Unavailable`, saying what is missing and how to fall back, and the same answer
/// when asked again (nothing half-started, no panic). `FEDSPINE_REQUIRE_GPU=1` (set by
/// `scripts/gpu-check.sh`) turns the second case into a failure.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_runs_the_reference_or_says_why_it_cannot() {
    match BackendKind::Wgpu.device() {
        Ok(device) => {
            let adapter = BackendKind::Wgpu
                .adapter()
                .expect("a started GPU backend knows its adapter");
            eprintln!("wgpu here: adapter {adapter}");
            let err = on_device::max_reference_error(&device);
            assert!(err < 0.05, "max top-5 logit error on wgpu: {err}");
            on_device::assert_tuning_matches_flex(&device);
            assert_eq!(
                BackendKind::Wgpu.device().unwrap(),
                device,
                "the started device is reused"
            );
        }
        Err(err) => {
            let BackendError::Unavailable { backend, why } = &err else {
                panic!("expected Unavailable, got {err:?}")
            };
            assert_eq!(*backend, BackendKind::Wgpu);
            let msg = err.to_string();
            eprintln!("wgpu here: {msg}");
            assert!(
                std::env::var_os("FEDSPINE_REQUIRE_GPU").is_none(),
                "FEDSPINE_REQUIRE_GPU is set, but {msg}"
            );
            assert_eq!(BackendKind::Wgpu.adapter(), None);
            assert!(
                msg.starts_with("backend 'wgpu' cannot start on this machine: "),
                "{msg}"
            );
            assert!(msg.contains("--backend flex"), "{msg}");
            let names_missing = why.contains("no GPU adapter found")
                || why.contains("software rasterizer")
                || why.contains("needs a GPU");
            assert!(names_missing, "says what is missing: {why}");
            assert_eq!(
                BackendKind::Wgpu.device().unwrap_err(),
                err,
                "asking again gives the same answer"
            );
        }
    }
}
