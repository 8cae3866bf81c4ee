//! LoRA adapters on the seven projections of every block: `W x + scale * B A x` with
//! `scale = alpha / rank`. Factors are stored in burn's `[in, out]` orientation: `a` is
//! `[in, rank]` and `b` is `[rank, out]`, so the delta is `a @ b`; on the wire (see
//! [`Adapter::to_host`]) they use the PyTorch orientation `A = a^T` (`[rank, in]`) and
//! `B = b^T` (`[out, rank]`).
//!
//! The adapter type itself and how a projection applies it live with the model
//! ([`crate::model::lora_layer`]); this module creates, resizes, converts, merges and saves
//! adapters.

use burn::tensor::{Device, Tensor, TensorData};
use protocol::Proj;

pub use crate::model::lora_layer::{Adapter, LoraFactors};
use crate::model::{module_name, Llama, ModelConfig};

/// Host copy of one projection's factors in wire orientation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostFactors {
    pub block: usize,
    pub proj: Proj,
    /// `[rank, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, rank]`, row-major.
    pub b: Vec<f32>,
    pub rows_out: usize,
    pub cols_in: usize,
}

/// In/out sizes of a projection in a block of the given config.
pub fn proj_dims(cfg: &ModelConfig, block: usize, p: Proj) -> (usize, usize) {
    let s = &cfg.blocks[block];
    let d = cfg.d_model;
    let hd = cfg.head_dim;
    match p {
        Proj::Q => (d, s.n_heads * hd),
        Proj::K | Proj::V => (d, s.n_kv_heads * hd),
        Proj::O => (s.n_heads * hd, d),
        Proj::Gate | Proj::Up => (d, s.ffn_dim),
        Proj::Down => (s.ffn_dim, d),
    }
}

impl Adapter {
    /// A fresh adapter: `A ~ N(0, 1/rank)`-style init (Kaiming-like, seeded), `B = 0`, so the
    /// model's output is unchanged when attached.
    pub fn new(cfg: &ModelConfig, rank: usize, alpha: f64, seed: u64, device: &Device) -> Self {
        use rand::SeedableRng;
        use rand_distr_free::normal;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let blocks = (0..cfg.n_layers())
            .map(|l| {
                Proj::ALL
                    .iter()
                    .map(|&p| {
                        let (din, dout) = proj_dims(cfg, l, p);
                        let std = 1.0 / (din.max(1) as f64).sqrt();
                        let a: Vec<f32> = (0..din * rank)
                            .map(|_| (normal(&mut rng) * std) as f32)
                            .collect();
                        LoraFactors {
                            a: Tensor::from_data(TensorData::new(a, [din, rank]), device),
                            b: Tensor::zeros([rank, dout], device),
                        }
                    })
                    .collect()
            })
            .collect();
        Adapter {
            rank,
            alpha,
            blocks,
        }
    }

    /// Copy to host buffers in wire orientation.
    pub fn to_host(&self) -> Vec<HostFactors> {
        let mut out = Vec::new();
        for (l, blk) in self.blocks.iter().enumerate() {
            for (&p, f) in Proj::ALL.iter().zip(blk) {
                let [din, r] = f.a.dims();
                let [_, dout] = f.b.dims();
                let a: Vec<f32> =
                    f.a.clone()
                        .transpose()
                        .into_data()
                        .try_to_vec()
                        .expect("LoRA factors are f32 tensors (created by Adapter::new as f32)");
                let b: Vec<f32> =
                    f.b.clone()
                        .transpose()
                        .into_data()
                        .try_to_vec()
                        .expect("LoRA factors are f32 tensors (created by Adapter::new as f32)");
                debug_assert_eq!(a.len(), r * din);
                out.push(HostFactors {
                    block: l,
                    proj: p,
                    a,
                    b,
                    rows_out: dout,
                    cols_in: din,
                });
            }
        }
        out
    }
}

/// Seeded standard-normal draws without an extra distribution crate (Box-Muller).
mod rand_distr_free {
    use rand::Rng;
    pub fn normal(rng: &mut impl Rng) -> f64 {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Errors reading or reshaping an adapter.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Adapter {
    /// Change the rank: truncate to the first `rank` components, or pad with fresh components
    /// (seeded `A` rows, zero `B` columns, so the model's output is unchanged). The scale
    /// `alpha / rank` changes with the rank, so `B` is rescaled to keep the delta `s * a @ b`
    /// of the kept components the same.
    pub fn resize(&self, rank: usize, seed: u64) -> Adapter {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let keep_scale = self.scale() / (self.alpha / rank.max(1) as f64);
        let blocks = self
            .blocks
            .iter()
            .map(|blk| {
                blk.iter()
                    .map(|f| {
                        let [din, r0] = f.a.dims();
                        let [_, dout] = f.b.dims();
                        let device = f.a.device();
                        let k = r0.min(rank);
                        let kept = (k > 0).then(|| {
                            (
                                f.a.clone().narrow(1, 0, k),
                                f.b.clone().narrow(0, 0, k).mul_scalar(keep_scale),
                            )
                        });
                        if rank == k {
                            let (a, b) = kept
                                .expect("rank == k > 0, so the loop above stored the kept factors");
                            return LoraFactors { a, b };
                        }
                        let std = 1.0 / (din.max(1) as f64).sqrt();
                        let extra: Vec<f32> = (0..din * (rank - k))
                            .map(|_| (rand_distr_free::normal(&mut rng) * std) as f32)
                            .collect();
                        let extra =
                            Tensor::from_data(TensorData::new(extra, [din, rank - k]), &device);
                        let zeros = Tensor::zeros([rank - k, dout], &device);
                        match kept {
                            Some((a, b)) => LoraFactors {
                                a: Tensor::cat(vec![a, extra], 1),
                                b: Tensor::cat(vec![b, zeros], 0),
                            },
                            None => LoraFactors { a: extra, b: zeros },
                        }
                    })
                    .collect()
            })
            .collect();
        Adapter {
            rank,
            alpha: self.alpha,
            blocks,
        }
    }

    /// Build from host factors in wire orientation (`A: [rank, in]`, `B: [out, rank]`).
    pub fn from_host(
        cfg: &ModelConfig,
        rank: usize,
        alpha: f64,
        factors: &[HostFactors],
        device: &Device,
    ) -> Result<Adapter, AdapterError> {
        let bad = |what: String| AdapterError::Invalid {
            path: "adapter".into(),
            what,
        };
        let mut blocks: Vec<Vec<Option<LoraFactors>>> =
            (0..cfg.n_layers()).map(|_| vec![None; 7]).collect();
        for f in factors {
            if f.block >= cfg.n_layers() {
                return Err(bad(format!(
                    "block {} beyond the model's {}",
                    f.block,
                    cfg.n_layers()
                )));
            }
            let (din, dout) = proj_dims(cfg, f.block, f.proj);
            if f.cols_in != din
                || f.rows_out != dout
                || f.a.len() != rank * din
                || f.b.len() != dout * rank
            {
                return Err(bad(format!(
                    "block {} {}: factors are A[{}x{}] B[{}x{}], the model needs A[{rank}x{din}] B[{dout}x{rank}]",
                    f.block, module_name(f.proj), f.a.len() / f.cols_in.max(1), f.cols_in, f.rows_out, f.b.len() / f.rows_out.max(1)
                )));
            }
            if f.a.iter().chain(&f.b).any(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "block {} {}: non-finite values",
                    f.block,
                    module_name(f.proj)
                )));
            }
            let a = Tensor::<2>::from_data(TensorData::new(f.a.clone(), [rank, din]), device)
                .transpose();
            let b = Tensor::<2>::from_data(TensorData::new(f.b.clone(), [dout, rank]), device)
                .transpose();
            blocks[f.block][f.proj.index()] = Some(LoraFactors { a, b });
        }
        let blocks = blocks
            .into_iter()
            .enumerate()
            .map(|(l, blk)| {
                blk.into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        f.ok_or_else(|| {
                            bad(format!("block {l} {} missing", module_name(Proj::ALL[i])))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Adapter {
            rank,
            alpha,
            blocks,
        })
    }

    /// Merge into a model of the same (pruned) shape: `W + scale * a @ b`.
    pub fn merge_into(&self, model: &Llama) -> Llama {
        let mut m = model.clone();
        let s = self.scale();
        for (l, blk) in m.blocks.iter_mut().enumerate() {
            for &p in &Proj::ALL {
                let f = &self.blocks[l][p.index()];
                let w = blk.weight(p).clone() + f.a.clone().matmul(f.b.clone()).mul_scalar(s);
                *blk.weight_mut(p) = w;
            }
        }
        m
    }

    /// Save as `adapter.safetensors` (PEFT-style names and orientation) plus `adapter.json`.
    pub fn save(
        &self,
        dir: &std::path::Path,
        extra: serde_json::Value,
    ) -> Result<(), AdapterError> {
        let io = |source| AdapterError::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let host = self.to_host();
        let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for f in &host {
            let name = format!("model.layers.{}.{}", f.block, module_name(f.proj));
            let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            bufs.push((
                format!("{name}.lora_A.weight"),
                vec![self.rank, f.cols_in],
                bytes(&f.a),
            ));
            bufs.push((
                format!("{name}.lora_B.weight"),
                vec![f.rows_out, self.rank],
                bytes(&f.b),
            ));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .expect("consistent view"),
                )
            })
            .collect();
        let path = dir.join("adapter.safetensors");
        let tmp = dir.join("adapter.safetensors.partial");
        safetensors::tensor::serialize_to_file(views, None, &tmp).map_err(|e| {
            AdapterError::Invalid {
                path: path.display().to_string(),
                what: e.to_string(),
            }
        })?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        let mut meta = serde_json::json!({ "rank": self.rank, "alpha": self.alpha, "blocks": self.blocks.len() });
        if let (Some(m), serde_json::Value::Object(e)) = (meta.as_object_mut(), extra) {
            m.extend(e);
        }
        std::fs::write(
            dir.join("adapter.json"),
            serde_json::to_string_pretty(&meta).expect(
                "adapter metadata is a JSON value built in memory; serialising it cannot fail",
            ),
        )
        .map_err(io)?;
        Ok(())
    }

    /// What `tune` saved in `dir`: `base` pruned to the kept maps in `adapter.json`, and the
    /// adapter trained on it.
    pub fn load_tuned(
        base: &Llama,
        dir: &std::path::Path,
    ) -> Result<(Llama, Adapter), AdapterError> {
        let (meta, bad) = read_meta(dir)?;
        let kept: protocol::KeptIndices = serde_json::from_value(meta["kept"].clone())
            .map_err(|e| bad(format!("missing or invalid 'kept' maps: {e}")))?;
        let model = crate::prune::slice_model(base, &kept)
            .map_err(|e| bad(format!("kept maps do not fit this base model: {e}")))?;
        let adapter = Adapter::load(dir, &model.config, &model.device)?;
        Ok((model, adapter))
    }

    /// Load what [`Adapter::save`] wrote, for a model of config `cfg` (already pruned to the
    /// adapter's kept maps).
    pub fn load(
        dir: &std::path::Path,
        cfg: &ModelConfig,
        device: &Device,
    ) -> Result<Adapter, AdapterError> {
        let (meta, bad) = read_meta(dir)?;
        let rank = meta["rank"]
            .as_u64()
            .ok_or_else(|| bad("no 'rank'".into()))? as usize;
        let alpha = meta["alpha"]
            .as_f64()
            .ok_or_else(|| bad("no 'alpha'".into()))?;
        let st_path = dir.join("adapter.safetensors");
        let bytes = std::fs::read(&st_path).map_err(|source| AdapterError::Io {
            path: st_path.display().to_string(),
            source,
        })?;
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| AdapterError::Invalid {
                path: st_path.display().to_string(),
                what: e.to_string(),
            })?;
        let read = |name: &str| -> Result<(Vec<f32>, Vec<usize>), AdapterError> {
            let v = st.tensor(name).map_err(|e| AdapterError::Invalid {
                path: st_path.display().to_string(),
                what: format!("{name}: {e}"),
            })?;
            if v.dtype() != safetensors::Dtype::F32 {
                return Err(AdapterError::Invalid {
                    path: st_path.display().to_string(),
                    what: format!("{name}: dtype {:?}, expected F32", v.dtype()),
                });
            }
            Ok((
                v.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                v.shape().to_vec(),
            ))
        };
        let mut host = Vec::new();
        for l in 0..cfg.n_layers() {
            for &p in &Proj::ALL {
                let name = format!("model.layers.{l}.{}", module_name(p));
                let (a, sa) = read(&format!("{name}.lora_A.weight"))?;
                let (b, sb) = read(&format!("{name}.lora_B.weight"))?;
                host.push(HostFactors {
                    block: l,
                    proj: p,
                    a,
                    b,
                    rows_out: sb[0],
                    cols_in: sa.get(1).copied().unwrap_or(0),
                });
            }
        }
        Adapter::from_host(cfg, rank, alpha, &host, device).map_err(|e| match e {
            AdapterError::Invalid { what, .. } => AdapterError::Invalid {
                path: st_path.display().to_string(),
                what,
            },
            other => other,
        })
    }
}

/// `dir/adapter.json` parsed, and a maker of errors that name it.
fn read_meta(
    dir: &std::path::Path,
) -> Result<(serde_json::Value, impl Fn(String) -> AdapterError), AdapterError> {
    let path = dir.join("adapter.json").display().to_string();
    let text =
        std::fs::read_to_string(dir.join("adapter.json")).map_err(|source| AdapterError::Io {
            path: path.clone(),
            source,
        })?;
    let bad = move |what: String| AdapterError::Invalid {
        path: path.clone(),
        what,
    };
    let meta = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    Ok((meta, bad))
}
