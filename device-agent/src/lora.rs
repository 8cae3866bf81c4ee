//! LoRA adapters on the seven projections of every block: `W x + scale * B A x` with
//! `scale = alpha / rank`. Factors are stored in burn's `[in, out]` orientation: `a` is
//! `[in, rank]` and `b` is `[rank, out]`, so the delta is `a @ b`; on the wire (see
//! [`Adapter::to_host`]) they use the PyTorch orientation `A = a^T` (`[rank, in]`) and
//! `B = b^T` (`[out, rank]`).

use burn::tensor::{Device, Tensor, TensorData};

use crate::model::{ModelConfig, Proj};

/// The factors of one adapted projection.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// `[in, rank]`
    pub a: Tensor<2>,
    /// `[rank, out]`
    pub b: Tensor<2>,
}

/// A LoRA adapter for a whole model: `blocks[l][proj.index()]`.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub rank: usize,
    pub alpha: f64,
    pub blocks: Vec<Vec<LoraFactors>>,
}

/// Host copy of one projection's factors in wire orientation.
#[derive(Debug, Clone, PartialEq)]
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
                        let a: Vec<f32> =
                            (0..din * rank).map(|_| (normal(&mut rng) * std) as f32).collect();
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

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }

    /// Factors and scale for block `l`, projection `p`.
    pub fn factors(&self, l: usize, p: Proj) -> Option<(&Tensor<2>, &Tensor<2>, f64)> {
        if self.rank == 0 {
            return None;
        }
        self.blocks
            .get(l)
            .and_then(|b| b.get(p.index()))
            .map(|f| (&f.a, &f.b, self.scale()))
    }

    /// Copy to host buffers in wire orientation.
    pub fn to_host(&self) -> Vec<HostFactors> {
        let mut out = Vec::new();
        for (l, blk) in self.blocks.iter().enumerate() {
            for (&p, f) in Proj::ALL.iter().zip(blk) {
                let [din, r] = f.a.dims();
                let [_, dout] = f.b.dims();
                let a: Vec<f32> = f.a.clone().transpose().into_data().try_to_vec().expect("f32");
                let b: Vec<f32> = f.b.clone().transpose().into_data().try_to_vec().expect("f32");
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
