//! FedSpine wire vocabulary: IDs, messages, adapter payloads, validation and the framed codec.
//!
//! This crate does no I/O and reads no clock: drivers (QUIC modules, the simulator) move bytes,
//! the coordinator and the agent session interpret [`Message`]s.

pub mod adapter;
mod buffer_codec;
pub mod codec;
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod ids;
pub mod message;
pub mod validate;

/// Version of the wire format; a peer with another version is refused with a clear error.
/// 2: `Capabilities::device_class`.
pub const PROTOCOL_VERSION: u16 = 2;

pub use adapter::{
    kept_shape, layer_index_map, AdapterPayload, BlockKept, Buffer, KeptIndices, LayerAdapter,
    LayerIndexMap, ModelDims, Proj, Side, Tensor2,
};
pub use codec::{
    decode_body, decode_frame, encode_frame, encode_frame_into, frame_body_len, frame_len,
    CodecError, Decoded, FrameDecoder, DEFAULT_MAX_FRAME_BYTES, FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
};
pub use ids::{DeviceId, RoundId, Timestamp};
pub use message::{
    check_device_class, Ack, Arm, Bye, ByeReason, Capabilities, FailReason, GlobalSlice, Heartbeat,
    Join, Message, RankPruning, Reject, RejectReason, RoundConfig, RoundFailed, RoundOptions,
    SparsityGoal, Update, UpdateStats, Welcome, MAX_BACKEND_CHARS, MAX_DEVICE_CLASS_CHARS,
    MAX_TARGET_SPARSITY, MIN_HEARTBEAT_INTERVAL_MS, SPARSITY_TOLERANCE, UNKNOWN_DEVICE_CLASS,
};
pub use validate::{
    validate_adapter, validate_dims, validate_kept, validate_update, Factor, ValidationError,
    ValidationLimits,
};
