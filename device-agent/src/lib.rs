//! FedSpine device agent: a LLaMA-family model on burn, its weights and tokenizer, structured
//! pruning with LoRA fine-tuning, evaluation, and export.

pub mod assets;
pub mod gguf;
pub mod lora;
pub mod model;
