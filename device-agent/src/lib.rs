//! FedSpine device agent: a LLaMA-family model on burn, its weights and tokenizer, structured
//! pruning with LoRA fine-tuning, evaluation, and export.

pub mod agent_config;
pub mod assets;
pub mod backend;
pub mod bf16;
pub mod client;
pub mod cost;
pub mod cpu;
pub mod data;
pub mod eval;
pub mod export;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod job;
#[macro_use]
pub mod kernels;
pub mod local_file;
pub mod lora;
pub mod model;
pub mod op_timer;
pub mod prune;
pub mod quant;
pub mod session;
pub mod state_dir;
#[cfg(test)]
mod test_values;
pub mod tokenizer;
pub mod train;
pub mod user_data;
pub mod weights;
pub mod wire;
pub mod workload;
