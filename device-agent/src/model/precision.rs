//! The arithmetic of a model's frozen base products ([`Precision`]): choosing it for this
//! backend and CPU, saying which kernel runs, and the LM head packed for bf16 products.

use super::Llama;
use crate::bf16::{self, Precision, PrecisionError};

impl Llama {
    /// Run the frozen base's products at `precision` where this backend and CPU can (see
    /// [`Precision::resolve`]); returns the precision that will run and, if it differs, why.
    pub fn set_precision(&mut self, precision: Precision) -> (Precision, Option<&'static str>) {
        let flex = crate::backend::is_flex(&self.device);
        let (p, why) = precision.resolve(flex);
        self.precision = p;
        (p, why)
    }

    /// [`Llama::set_precision`] from a flag or config value (`fp32`, `bf16`, `int8`, `auto`: see
    /// [`Precision::requested`]), saying on stderr why when the precision that runs is not the
    /// one asked for; returns the one that runs.
    pub fn apply_precision(&mut self, name: &str) -> Result<Precision, PrecisionError> {
        let flex = crate::backend::is_flex(&self.device);
        let (p, why) = self.set_precision(Precision::requested(name, flex)?);
        if name.eq_ignore_ascii_case("auto") && p == Precision::Fp32 {
            eprintln!("precision: auto: no bf16 products on this CPU or backend; running fp32");
        }
        if let Some(why) = why {
            eprintln!("precision: {why}");
        }
        if let (Precision::Bf16, Some(kernel)) = (p, crate::bf16::gemm::Kernel::detect()) {
            eprintln!("precision: bf16 products on {kernel}");
        }
        if p == Precision::Int8 {
            eprintln!(
                "precision: int8 products on {}",
                crate::cpu::DotPath::detect()
            );
        }
        Ok(p)
    }

    /// The arithmetic the frozen base's products run in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// With bf16 products on an fp32 base, the LM head rounded and packed once, for callers
    /// that take logits over many row chunks (the training loss, with `gradients`; scoring);
    /// `None` otherwise.
    pub fn bf16_head(&self, gradients: bool) -> Option<bf16::PackedHead> {
        if self.precision != Precision::Bf16 || self.quant.is_some() {
            return None;
        }
        bf16::PackedHead::new(&self.head_rows(), gradients)
    }
}
