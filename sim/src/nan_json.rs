//! serde_json writes NaN and the infinities as `null`; the report types read such a `null`
//! back as NaN with [`f64_or_nan`], so a run folder whose model diverged still reads back
//! (`sim compare --resume`) and says so, instead of failing to parse. Checks that refuse
//! non-finite numbers (the device-round dataset's `DeviceRound::check`) run after parsing.

use serde::{Deserialize, Deserializer};

/// An `f64` written as a number, or as `null` for NaN.
pub fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}
