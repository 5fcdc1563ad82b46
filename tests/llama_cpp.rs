//! Our GGUF files and engine against llama.cpp's own, through llama-cpp-python
//! (`scripts/with-llama-cpp`, part of `scripts/test`): llama.cpp reads the files our writer
//! makes, tokenizes as our tokenizer does, and decodes the same greedy tokens.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use synthia_bot::inference::{LoadOptions, load};

/// Asks llama.cpp (tests/llama_cpp/engine.py) one question.
fn llama_cpp(request: serde_json::Value) -> serde_json::Value {
    let python = common::llama_server::python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/llama_cpp/engine.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the llama.cpp venv's python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "llama.cpp failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A few hundred varied strings from a fixed seed: words, spaces, punctuation, digits, code,
/// role markers and special-token text, accents, CJK and emoji.
fn varied_texts() -> Vec<String> {
    let pieces = [
        "Hello",
        "world",
        "the",
        "capital",
        "of",
        "France",
        "is",
        "Paris",
        "SYSTEM:",
        "USER:",
        "ASSISTANT:",
        "<s>",
        "</s>",
        "<unk>",
        "[INST]",
        "naïve",
        "café",
        "Straße",
        "日本語",
        "中文",
        "한국어",
        "🤖",
        "👍🏽",
        "∑",
        "€",
        "3.14159",
        "1234567890",
        "0x1F",
        "fn main() {",
        "}",
        "print('hi')",
        "a+b=c",
        "--",
        "...",
        "?!",
        "\"quoted\"",
        "it's",
        "e.g.",
        "URL:",
        "https://example.org/a?b=c",
        "#hashtag",
        "@mention",
        "~tilde",
        "\\back",
        "tab\tbed",
        "new\nline",
        "\r\n",
        "ünïcödé",
        "ﬁ",
        "Ω",
        "ñ",
        "Привет",
        "مرحبا",
        "שלום",
        "x",
    ];
    let seps = [" ", "  ", "", "\n", "\t", " \n ", ", ", "   "];
    let mut state: u64 = 20261201;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let mut out: Vec<String> = pieces.iter().map(|p| p.to_string()).collect();
    out.extend(
        [
            "",
            " ",
            "  ",
            "\n",
            " leading",
            "trailing ",
            "\n\nblank lines\n\n",
        ]
        .map(String::from),
    );
    while out.len() < 300 {
        let words = 1 + next(8);
        let mut s = String::new();
        if next(4) == 0 {
            s.push_str(seps[next(seps.len())]);
        }
        for i in 0..words {
            if i > 0 {
                s.push_str(seps[next(seps.len())]);
            }
            s.push_str(pieces[next(pieces.len())]);
        }
        out.push(s);
    }
    out
}

#[test]
fn llama_cpp_reads_our_gguf_and_tokenizes_as_we_do() {
    let model = common::tiny_gguf("f32");
    let texts = varied_texts();
    let answer = llama_cpp(serde_json::json!({
        "op": "tokenize",
        "model": model,
        "texts": texts,
    }));
    let theirs: Vec<Vec<u32>> = serde_json::from_value(answer["ids"].clone()).unwrap();
    let ours = load(&model, &LoadOptions::default()).unwrap().tokenizer;
    let mut differ = Vec::new();
    for (text, want) in texts.iter().zip(&theirs) {
        let got = ours.encode(text, false).unwrap();
        if &got != want {
            differ.push(format!("{text:?}: ours {got:?}, llama.cpp {want:?}"));
        }
    }
    assert_eq!(theirs.len(), texts.len());
    assert!(
        differ.is_empty(),
        "{} of {} strings tokenize differently:\n{}",
        differ.len(),
        texts.len(),
        differ.join("\n")
    );
}

#[test]
fn the_same_f32_gguf_decodes_the_same_greedy_tokens_in_both_engines() {
    let model = common::tiny_gguf("f32");
    let loaded = load(&model, &LoadOptions::default()).unwrap();
    let prompt = loaded
        .tokenizer
        .encode(
            "SYSTEM: You are Synthia.\nUSER: What is the capital of France?\nASSISTANT:",
            true,
        )
        .unwrap();
    let n = 32;
    let answer = llama_cpp(serde_json::json!({
        "op": "greedy",
        "model": model,
        "prompt": prompt,
        "n": n,
    }));
    let theirs: Vec<u32> = serde_json::from_value(answer["ids"].clone()).unwrap();
    let their_logits: Vec<f32> = serde_json::from_value(answer["first_logits"].clone()).unwrap();

    let m = &loaded.model;
    let mut cache = m.new_cache();
    let mut logits = m.forward(&prompt, &mut cache).unwrap();
    let first = logits.to_vec1::<f32>().unwrap();
    let mut ours = Vec::new();
    for _ in 0..n {
        let next = synthia_bot::inference::model::argmax(&logits).unwrap();
        ours.push(next);
        if loaded.eos_ids.contains(&next) {
            break;
        }
        logits = m.forward(&[next], &mut cache).unwrap();
    }
    let max_diff = first
        .iter()
        .zip(&their_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("largest first-step logit difference, ours vs llama.cpp: {max_diff:.2e}");
    assert_eq!(first.len(), their_logits.len());
    assert_eq!(
        ours, theirs,
        "greedy ids (largest logit difference {max_diff:.2e})"
    );
    assert!(max_diff < 1e-2, "largest logit difference {max_diff}");
}
