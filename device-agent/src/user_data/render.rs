//! Turning records into token sequences: chats rendered with the ChatML template and a
//! per-token loss mask on the assistant's tokens, documents with every token in the loss, the
//! packing of sequences into fixed-length windows, and labelled texts as classification
//! examples through the LM.

use crate::tokenizer::{self, Tok, TokenizerError};
use crate::workload::{ClsExample, SpamTask};

use super::parse::{Message, Role};
use super::MaskedWindow;

/// Token ids with, per token, whether the loss counts it (`true`: the model learns to
/// predict this token).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MaskedTokens {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
}

impl MaskedTokens {
    fn push(&mut self, ids: Vec<u32>, learn: bool) {
        self.mask.extend(std::iter::repeat_n(learn, ids.len()));
        self.ids.extend(ids);
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Longest piece of a document encoded at once: the tokenizer keeps tens of bytes per token
/// while it encodes, so a long file is encoded a piece at a time.
pub const PIECE_BYTES: usize = 1 << 20;

/// A document for causal-LM training: its tokens and the end-of-text token, all learned. A
/// document longer than [`PIECE_BYTES`] is encoded in pieces that end at a line break (or, in a
/// line longer than that, at a character boundary), so its tokens may differ from encoding it
/// whole only where pieces meet; a shorter one is encoded whole.
pub fn document(tok: &Tok, text: &str) -> Result<MaskedTokens, TokenizerError> {
    let mut out = MaskedTokens::default();
    let mut rest = text;
    while rest.len() > PIECE_BYTES {
        let mut end = PIECE_BYTES;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        // After the last line break in the piece, when there is one.
        if let Some(nl) = rest[..end].rfind('\n') {
            end = nl + 1;
        }
        out.push(tok.encode(&rest[..end])?, true);
        rest = &rest[end..];
    }
    out.push(tok.encode(rest)?, true);
    out.push(vec![tok.eos], true);
    Ok(out)
}

/// A conversation in ChatML, `<|im_start|>role\ncontent<|im_end|>\n` per message, with the
/// default system message first when the conversation brings none (as `Tok::chat_prompt`
/// does). The loss covers each assistant message's content and its closing `<|im_end|>`; the
/// headers, the other messages and the newline after `<|im_end|>` are context only. Pieces
/// are encoded one by one, so the assistant's tokens are those the model would produce after
/// the header at generation time.
pub fn chat(tok: &Tok, messages: &[Message]) -> Result<MaskedTokens, TokenizerError> {
    let mut out = MaskedTokens::default();
    let mut message = |role: Role, content: &str| -> Result<(), TokenizerError> {
        let learn = role == Role::Assistant;
        out.push(tok.encode(&tokenizer::chatml_header(role.name()))?, false);
        out.push(tok.encode(content)?, learn);
        out.push(tok.encode(tokenizer::CHATML_END)?, learn);
        out.push(tok.encode("\n")?, false);
        Ok(())
    };
    if messages.first().is_none_or(|m| m.role != Role::System) {
        message(Role::System, tok.default_system())?;
    }
    for m in messages {
        message(m.role, &m.content)?;
    }
    Ok(out)
}

/// Pack `parts` end to end and cut the stream into windows of `seq_len + 1` tokens that
/// overlap by one token, so every token after the first is a target exactly once. The last
/// window is padded with `pad` (not learned). Windows without any learned target are dropped.
pub fn pack(parts: &[MaskedTokens], seq_len: usize, pad: u32) -> Vec<MaskedWindow> {
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for p in parts {
        ids.extend_from_slice(&p.ids);
        mask.extend_from_slice(&p.mask);
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < ids.len() {
        let end = (start + seq_len + 1).min(ids.len());
        let mut w = MaskedWindow {
            tokens: ids[start..end].to_vec(),
            mask: mask[start..end].to_vec(),
        };
        w.tokens.resize(seq_len + 1, pad);
        w.mask.resize(seq_len + 1, false);
        if w.mask[1..].iter().any(|&m| m) {
            out.push(w);
        }
        start += seq_len;
    }
    out
}

/// Cut a document into pieces of at most `seq_len` tokens (the units of the held-out split).
pub fn pieces(doc: MaskedTokens, seq_len: usize) -> Vec<MaskedTokens> {
    doc.ids
        .chunks(seq_len.max(1))
        .zip(doc.mask.chunks(seq_len.max(1)))
        .map(|(i, m)| MaskedTokens {
            ids: i.to_vec(),
            mask: m.to_vec(),
        })
        .collect()
}

/// The question that follows a labelled text; the answer is the label's first token.
pub fn label_question(labels: &[String; 2]) -> String {
    format!(
        "\n\nQuestion: Which label fits this text, {} or {}? Answer:",
        labels[0], labels[1]
    )
}

/// The label-through-the-LM task for two labels (sorted): the second label plays the part of
/// the spam task's "yes", the first its "no", each by the first token of `" label"`.
pub fn label_task(
    tok: &Tok,
    labels: &[String; 2],
    max_text_tokens: usize,
) -> Result<Result<SpamTask, String>, TokenizerError> {
    let first = |s: &str| -> Result<Option<u32>, TokenizerError> {
        Ok(tok.encode(&format!(" {s}"))?.first().copied())
    };
    let (no, yes) = (first(&labels[0])?, first(&labels[1])?);
    Ok(match (no, yes) {
        (Some(no), Some(yes)) if no != yes => Ok(SpamTask {
            yes,
            no,
            max_body_tokens: max_text_tokens,
        }),
        _ => Err(format!(
            "labels \"{}\" and \"{}\" begin with the same token; the label is predicted by its \
             first token, so the labels must differ there",
            labels[0], labels[1]
        )),
    })
}

/// One classification example: the text (truncated to the task's budget), then the question.
pub fn label_example(
    tok: &Tok,
    task: &SpamTask,
    question: &str,
    text: &str,
    label_is_second: bool,
) -> Result<ClsExample, TokenizerError> {
    let mut prompt = tok.encode(text)?;
    prompt.truncate(task.max_body_tokens);
    prompt.extend(tok.encode(question)?);
    Ok(ClsExample {
        prompt,
        label: label_is_second,
    })
}
