//! Tests of the user-data reader on small fixture files and a tiny byte-level tokenizer with
//! the ChatML markers.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::*;

/// The byte-level alphabet: printable bytes stand for themselves, the others for code points
/// from 256 up.
fn byte_chars() -> Vec<char> {
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            if printable {
                char::from_u32(b).expect("byte")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("code point")
            }
        })
        .collect()
}

/// A tokenizer with three specials, the 256 bytes and merges of a space with each lower-case
/// letter (so " yes" and " no" begin with different tokens).
fn tiny_tok(dir: &Path) -> Tok {
    let mut vocab: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let chars = byte_chars();
    vocab.extend(chars.iter().map(char::to_string));
    let space = chars[b' ' as usize].to_string();
    let mut merges = Vec::new();
    for c in 'a'..='z' {
        merges.push((space.clone(), c.to_string()));
        vocab.push(format!("{space}{c}"));
    }
    let vocab: tokenizers::models::bpe::Vocab = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .expect("bpe");
    let mut tk = Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    tk.add_special_tokens(&[
        AddedToken::from("<|endoftext|>", true),
        AddedToken::from("<|im_start|>", true),
        AddedToken::from("<|im_end|>", true),
    ]);
    let path = dir.join("tokenizer.json");
    tk.save(&path, false).expect("save tokenizer");
    let tok = Tok::from_file(&path, None, None, None).expect("tiny tokenizer");
    assert!(tok.chatml);
    tok
}

/// A fresh scratch directory with `files` (name, content) written into it.
/// A fresh scratch directory with `files` (name, content) written into its `data` folder,
/// removed when dropped.
fn fixture(tag: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("fedspine-userdata-{tag}-"))
        .tempdir()
        .expect("scratch dir");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("scratch dir");
    for (name, content) in files {
        std::fs::write(data.join(name), content).expect("fixture");
    }
    tmp
}

fn cfg(seq_len: usize) -> UserDataConfig {
    UserDataConfig {
        seq_len,
        test_fraction: 0.25,
        seed: 7,
        max_text_tokens: 64,
    }
}

fn lm(data: UserData) -> MaskedShard {
    match data {
        UserData::Lm(s) => s,
        other => panic!("expected LM data, got {other:?}"),
    }
}

/// The runs of consecutive learned tokens.
fn learned_runs(t: &MaskedTokens) -> Vec<Vec<u32>> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut open = false;
    for (&id, &m) in t.ids.iter().zip(&t.mask) {
        if m && open {
            runs.last_mut().expect("open run").push(id);
        } else if m {
            runs.push(vec![id]);
        }
        open = m;
    }
    runs
}

#[test]
fn plain_text_and_text_records_train_on_every_token() {
    let long = "the whale swam on and on. ".repeat(20);
    let tmp_dir = fixture(
        "text",
        &[
            ("a.txt", long.as_str()),
            ("b.md", "# Notes\nsome markdown text\n"),
            (
                "c.jsonl",
                "{\"text\": \"first doc\"}\n\n{\"text\": \"second doc\"}\n",
            ),
        ],
    );
    let dir = tmp_dir.path().to_path_buf();
    let tok = tiny_tok(&dir);
    let shard = lm(load(&dir.join("data"), &tok, &cfg(32)).expect("loads"));
    let all: Vec<&MaskedWindow> = shard.train.iter().chain(&shard.test).collect();
    assert!(!shard.test.is_empty() && shard.train.len() > shard.test.len());
    for w in &all {
        assert_eq!(w.tokens.len(), 33);
        // Learned tokens form a prefix: only the padding of a last window is not learned.
        let n = w.mask.iter().take_while(|&&m| m).count();
        assert!(w.mask[n..].iter().all(|&m| !m));
        assert!(w.tokens[n..].iter().all(|&t| t == tok.eos));
    }
    // Every document token is a target exactly once (windows overlap by one token).
    let total: usize = ["a.txt", "b.md"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join("data").join(f)).unwrap())
        .chain(["first doc".to_string(), "second doc".to_string()])
        .map(|t| tok.encode(&t).unwrap().len() + 1)
        .sum();
    let targets: usize = all
        .iter()
        .map(|w| w.mask[1..].iter().filter(|&&m| m).count())
        .sum();
    // Only the first token of each side of the split (train, test) is no target.
    assert_eq!(targets + 2, total);
}

#[test]
fn chat_masks_cover_exactly_the_assistant_tokens() {
    let tmp_dir = fixture("chat-mask", &[]);
    let dir = tmp_dir.path().to_path_buf();
    let tok = tiny_tok(&dir);
    let messages = vec![
        Message {
            role: Role::User,
            content: "What is a whale?".into(),
        },
        Message {
            role: Role::Assistant,
            content: "A large sea mammal.".into(),
        },
        Message {
            role: Role::User,
            content: "And a shark?".into(),
        },
        Message {
            role: Role::Assistant,
            content: "A fish, with\ncartilage.".into(),
        },
    ];
    let t = render::chat(&tok, &messages).expect("renders");
    let end = tok.token_to_id("<|im_end|>").expect("im_end");
    let runs = learned_runs(&t);
    assert_eq!(runs.len(), 2);
    for (run, want) in runs
        .iter()
        .zip(["A large sea mammal.", "A fish, with\ncartilage."])
    {
        assert_eq!(*run.last().expect("run"), end);
        assert_eq!(tok.decode(&run[..run.len() - 1]).unwrap(), want);
    }
    // The whole rendering is the ChatML text with the default system message first.
    let text = format!(
        "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\nWhat is a whale?<|im_end|>\n\
         <|im_start|>assistant\nA large sea mammal.<|im_end|>\n<|im_start|>user\nAnd a shark?\
         <|im_end|>\n<|im_start|>assistant\nA fish, with\ncartilage.<|im_end|>\n",
        tok.default_system()
    );
    assert_eq!(t.ids, tok.encode(&text).unwrap());
}

#[test]
fn instruction_records_render_like_the_generate_prompt() {
    let tmp_dir = fixture(
        "instruction",
        &[(
            "i.jsonl",
            "{\"instruction\": \"Summarise.\", \"input\": \"Call me Ishmael.\", \"output\": \"A name.\"}\n\
             {\"instruction\": \"Say hi.\", \"output\": \"Hi!\"}\n\
             {\"instruction\": \"Count.\", \"input\": \"\", \"output\": \"One, two.\"}\n",
        )],
    );
    let dir = tmp_dir.path().to_path_buf();
    let tok = tiny_tok(&dir);
    let (format, records) = parse::read_file(&dir.join("data/i.jsonl")).expect("parses");
    assert_eq!(format, Format::JsonlInstruction);
    let RecordBody::Chat(m) = &records[0].body else {
        panic!("instruction records become chats")
    };
    assert_eq!(m[0].content, "Summarise.\n\nCall me Ishmael.");
    let t = render::chat(&tok, m).unwrap();
    let want = format!(
        "{}A name.<|im_end|>\n",
        tok.chat_prompt("Summarise.\n\nCall me Ishmael.", None)
    );
    assert_eq!(t.ids, tok.encode(&want).unwrap());
    let RecordBody::Chat(m) = &records[2].body else {
        panic!("instruction records become chats")
    };
    assert_eq!(m[0].content, "Count.");
    let shard = lm(load(&dir.join("data"), &tok, &cfg(16)).expect("loads"));
    let b = shard.batch(0, 2);
    assert_eq!(b.tokens.len(), 2);
    let learned: usize = shard.train[0].mask[1..].iter().filter(|&&m| m).count()
        + shard.train[1 % shard.train.len()].mask[1..]
            .iter()
            .filter(|&&m| m)
            .count();
    assert_eq!(b.n_targets(), learned);
}

#[test]
fn classification_records_use_the_spam_item_type() {
    let mut lines = String::new();
    for i in 0..12 {
        let label = if i % 3 == 0 { "spam" } else { "ham" };
        lines.push_str(&format!(
            "{{\"text\": \"mail number {i}\", \"label\": \"{label}\"}}\n"
        ));
    }
    let tmp_dir = fixture("cls", &[("mail.jsonl", lines.as_str())]);
    let dir = tmp_dir.path().to_path_buf();
    let tok = tiny_tok(&dir);
    let UserData::Cls {
        task,
        shard,
        labels,
    } = load(&dir.join("data/mail.jsonl"), &tok, &cfg(16)).expect("loads")
    else {
        panic!("expected classification data")
    };
    assert_eq!(labels, ["ham".to_string(), "spam".to_string()]);
    assert_eq!(task.yes, tok.encode(" spam").unwrap()[0]);
    assert_eq!(task.no, tok.encode(" ham").unwrap()[0]);
    assert_eq!((shard.train.len(), shard.test.len()), (9, 3));
    let spam = shard
        .train
        .iter()
        .chain(&shard.test)
        .filter(|e| e.label)
        .count();
    assert_eq!(spam, 4);
    let question = tok.encode(&render::label_question(&labels)).unwrap();
    assert!(shard.train.iter().all(|e| e.prompt.ends_with(&question)));
}

#[test]
fn the_split_is_seeded_and_disjoint() {
    let mut lines = String::new();
    for i in 0..40 {
        lines.push_str(&format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"q{i}\"}}, \
             {{\"role\": \"assistant\", \"content\": \"answer {i}\"}}]}}\n"
        ));
    }
    let tmp_dir = fixture("split", &[("chat.jsonl", lines.as_str())]);
    let dir = tmp_dir.path().to_path_buf();
    let tok = tiny_tok(&dir);
    let path = dir.join("data");
    let a = lm(load(&path, &tok, &cfg(24)).unwrap());
    assert_eq!(a, lm(load(&path, &tok, &cfg(24)).unwrap()));
    let other = UserDataConfig { seed: 8, ..cfg(24) };
    assert_ne!(a, lm(load(&path, &tok, &other).unwrap()));
    // Items (here whole conversations) land on one side only, none is lost.
    let (train, test) = split((0..40).collect::<Vec<u32>>(), 0.25, 3).unwrap();
    assert_eq!(test.len(), 10);
    let mut all: Vec<u32> = train.iter().chain(&test).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..40).collect::<Vec<_>>());
    let end = tok
        .token_to_id("<|im_end|>")
        .expect("the test vocabulary has <|im_end|>");
    let answers = |ws: &[MaskedWindow]| -> Vec<String> {
        let mut v: Vec<String> = ws
            .iter()
            .flat_map(|w| {
                let t = MaskedTokens {
                    ids: w.tokens.clone(),
                    mask: w.mask.clone(),
                };
                learned_runs(&t)
            })
            // Only whole answers: a window boundary can cut a run, and "answer 1" cut from
            // "answer 11" is not an item of its own.
            .filter(|r| r.last() == Some(&end))
            .map(|r| tok.decode(&r).unwrap())
            .filter(|s| s.starts_with("answer"))
            .collect();
        v.sort();
        v
    };
    let (tr, te) = (answers(&a.train), answers(&a.test));
    assert!(te.iter().all(|s| !tr.contains(s)), "{te:?} in {tr:?}");
    // At least one item is held out even for a tiny fraction.
    let (_, test) = split(vec![1, 2], 0.01, 0).unwrap();
    assert_eq!(test.len(), 1);
}

#[test]
fn bad_files_are_reported_with_file_and_line() {
    let chat = |role: &str, content: &str| {
        format!("{{\"messages\": [{{\"role\": \"{role}\", \"content\": {content}}}]}}")
    };
    let ok = chat("assistant", "\"fine\"");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a.jsonl",
            format!("{ok}\n{{not json\n"),
            "a.jsonl:2: invalid JSON",
        ),
        (
            "b.jsonl",
            format!("{ok}\n\n{}\n", chat("robot", "\"beep\"")),
            "b.jsonl:3: message 1: unknown role \"robot\"",
        ),
        (
            "c.jsonl",
            "{\"messages\": [{\"role\": \"user\"}]}\n".into(),
            "c.jsonl:1: message 1: missing \"content\"",
        ),
        (
            "d.jsonl",
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": 3}\n".into(),
            "d.jsonl:2: \"label\" must be a string, found 3",
        ),
        (
            "e.jsonl",
            format!("{{\"text\": \"a\"}}\n{ok}\n"),
            "e.jsonl:2: unexpected key \"messages\": this file holds text records",
        ),
        ("f.jsonl", "\n\n".into(), "f.jsonl: the file is empty"),
        ("g.txt", "  \n".into(), "g.txt: the file is empty"),
        (
            "h.jsonl",
            "{\"prompt\": \"a\"}\n".into(),
            "h.jsonl:1: unknown record keys [\"prompt\"]",
        ),
        ("i.csv", "a,b\n".into(), "i.csv: unsupported file type"),
        (
            "j.jsonl",
            chat("user", "\"only a question\""),
            "j.jsonl:1: no assistant message",
        ),
        (
            "k.jsonl",
            "{\"instruction\": \"a\", \"input\": \"b\"}\n".into(),
            "k.jsonl:1: missing \"output\"",
        ),
        (
            "l.jsonl",
            "[1, 2]\n".into(),
            "l.jsonl:1: a record must be a JSON object",
        ),
    ];
    for (name, content, want) in &cases {
        let tmp_dir = fixture(&format!("bad-{name}"), &[(name, content)]);
        let dir = tmp_dir.path().to_path_buf();
        let tok = tiny_tok(&dir);
        let err = load(&dir.join("data").join(name), &tok, &cfg(16))
            .expect_err(name)
            .to_string();
        assert!(err.contains(want), "{name}: got '{err}', want '{want}'");
    }
    // A directory mixing classification and language-model files is refused, naming both.
    let tmp_dir = fixture(
        "bad-mix",
        &[
            ("a.jsonl", "{\"text\": \"a\", \"label\": \"x\"}\n"),
            ("b.txt", "some text"),
            (".hidden", "ignored"),
        ],
    );
    let dir = tmp_dir.path().to_path_buf();
    let tok = tiny_tok(&dir);
    let err = load(&dir.join("data"), &tok, &cfg(16))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.jsonl holds classification records but"),
        "{err}"
    );
    assert!(err.contains("b.txt holds plain text"), "{err}");
}

#[test]
fn classification_needs_two_labels_that_differ_in_their_first_token() {
    let tmp_dir = fixture(
        "labels",
        &[
            ("three.jsonl", "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"y\"}\n{\"text\": \"c\", \"label\": \"z\"}\n"),
            ("same.jsonl", "{\"text\": \"a\", \"label\": \"yes\"}\n{\"text\": \"b\", \"label\": \"yellow\"}\n"),
        ],
    );
    let dir = tmp_dir.path().to_path_buf();
    let tok = tiny_tok(&dir);
    let err = load(&dir.join("data/three.jsonl"), &tok, &cfg(16)).unwrap_err();
    assert!(
        err.to_string()
            .contains("exactly two distinct labels; found 3"),
        "{err}"
    );
    let err = load(&dir.join("data/same.jsonl"), &tok, &cfg(16)).unwrap_err();
    assert!(
        err.to_string().contains("begin with the same token"),
        "{err}"
    );
}

/// What is not a data file, or too much of one, is refused by name before anything is read: a
/// FIFO (reading it would block), a link to a device that never ends, a file over the
/// one-file limit and files over the total (sparse, so nothing of them exists on disk).
#[cfg(unix)]
#[test]
fn special_files_and_oversized_data_are_refused_unread() {
    let tmp = fixture("special", &[("a.txt", "some text\n")]);
    let data = tmp.path().join("data");
    let tok = tiny_tok(tmp.path());
    let expect = |path: &Path, says: &str| {
        let e = load(path, &tok, &cfg(8)).expect_err("refused").to_string();
        assert!(e.contains(says), "{says:?} in {e}");
    };
    let fifo = data.join("b.txt");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    expect(&data, "b.txt: is a FIFO, not a data file");
    expect(&fifo, "b.txt: is a FIFO, not a data file");
    std::fs::remove_file(&fifo).unwrap();
    std::os::unix::fs::symlink("/dev/zero", data.join("z.txt")).unwrap();
    expect(&data, "z.txt: is a device, not a data file");
    std::fs::remove_file(data.join("z.txt")).unwrap();

    let big = std::fs::File::create(data.join("big.txt")).unwrap();
    big.set_len(parse::MAX_FILE_BYTES + 1).unwrap();
    expect(
        &data,
        "big.txt: 268435457 bytes, over the 268435456-byte limit",
    );
    big.set_len(parse::MAX_FILE_BYTES).unwrap();
    for name in ["c.txt", "d.txt"] {
        std::fs::File::create(data.join(name))
            .unwrap()
            .set_len(parse::MAX_FILE_BYTES / 2)
            .unwrap();
    }
    expect(&data, "the data files hold over 536870912 bytes in all");
}

/// A document longer than a piece is encoded a piece at a time and loses or repeats nothing
/// where pieces meet (it decodes back to itself), in lines and in one long line; a shorter one
/// is encoded whole.
#[test]
fn long_documents_are_encoded_in_pieces_that_decode_to_the_text() {
    let tmp = fixture("pieces", &[]);
    let tok = tiny_tok(tmp.path());
    let line = "a line of text, é and ü included, then a break\n";
    let lines = line.repeat(render::PIECE_BYTES * 5 / 2 / line.len());
    let one_line = "wörds ".repeat(render::PIECE_BYTES * 3 / 2 / 7);
    for text in [&lines, &one_line] {
        assert!(text.len() > render::PIECE_BYTES);
        let doc = render::document(&tok, text).unwrap();
        let (last, body) = doc.ids.split_last().unwrap();
        assert_eq!(*last, tok.eos);
        assert_eq!(&tok.decode(body).unwrap(), text);
        assert!(doc.mask.iter().all(|&m| m));
    }
    let short = render::document(&tok, line).unwrap();
    let mut whole = tok.encode(line).unwrap();
    whole.push(tok.eos);
    assert_eq!(short.ids, whole);
}
