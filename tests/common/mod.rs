//! Helpers shared by the whole-flow tests: the real Llama-2 tokenizer and seeded random models.
#![allow(dead_code)]

pub mod daemon;
pub mod fault_proxy;
pub mod llama_server;
pub mod postgres;
pub mod proxy;
pub mod sink;

use std::path::{Path, PathBuf};

use candle_core::DType;
use synthia_bot::bench::random_model::{self, GgufPreset};
use synthia_bot::config::DTypeChoice;
use synthia_bot::inference::{LoadOptions, Worker, WorkerOptions, load};

pub const SEED: u64 = 7;

pub fn tokenizer_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama2-tokenizer/tokenizer.json")
}

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("models-v{}", random_model::GENERATOR_VERSION))
}

/// Writes `name` once (tests run in parallel processes: write aside, then rename into place).
fn once(name: &str, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let target = models_dir().join(name);
    if target.exists() {
        return target;
    }
    std::fs::create_dir_all(models_dir()).unwrap();
    let scratch = models_dir().join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    write(&scratch).unwrap();
    let from = if name.ends_with(".gguf") {
        scratch.join(name)
    } else {
        scratch.clone()
    };
    if std::fs::rename(&from, &target).is_err() && !target.exists() {
        panic!("could not place test model {name}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
    target
}

/// The tiny random Llama in the Hugging Face layout (f32, one file).
pub fn tiny_hf() -> PathBuf {
    once("tiny-hf", |dir| {
        let shape = random_model::named_shape("tiny").unwrap();
        random_model::write_hf_dir(dir, &shape, SEED, &tokenizer_path(), 1, DType::F32)
    })
}

/// The same weights in three shards with an index.
pub fn tiny_sharded() -> PathBuf {
    once("tiny-sharded", |dir| {
        let shape = random_model::named_shape("tiny").unwrap();
        random_model::write_hf_dir(dir, &shape, SEED, &tokenizer_path(), 3, DType::F32)
    })
}

/// The same weights as GGUF, with the tokenizer beside it.
pub fn tiny_gguf(preset: &str) -> PathBuf {
    let dir = once(&format!("tiny-gguf-{preset}"), |dir| {
        let shape = random_model::named_shape("tiny").unwrap();
        std::fs::copy(tokenizer_path(), dir.join("tokenizer.json"))?;
        random_model::write_gguf(
            &dir.join("model.gguf"),
            &shape,
            SEED,
            GgufPreset::parse(preset).unwrap(),
            &tokenizer_path(),
        )
    });
    dir.join("model.gguf")
}

/// A copy of the tiny model directory to break in one test.
pub fn broken_copy(tmp: &Path) -> PathBuf {
    let src = tiny_hf();
    let dst = tmp.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}

/// Runs `cmd` with `input` piped in, its output captured; it must succeed.
pub fn run_piped(cmd: &mut std::process::Command, input: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Everything `out` prints, gathered on a thread, so a test can wait for what it shows.
pub fn gather(
    mut out: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<String>> {
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let shared = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            shared
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

/// The real Llama-2 tokenizer, loaded.
pub fn llama2() -> std::sync::Arc<synthia_bot::inference::tokenizer::TextTokenizer> {
    std::sync::Arc::new(
        synthia_bot::inference::tokenizer::TextTokenizer::from_file(&tokenizer_path()).unwrap(),
    )
}

/// How many answers a piped `chat` printed.
pub fn chat_answers(out: &std::process::Output) -> usize {
    String::from_utf8_lossy(&out.stdout)
        .matches("Synthia: ")
        .count()
}

/// `export`'s JSON Lines.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A worker serving the tiny model in f32 on the CPU.
pub fn tiny_worker(opts: WorkerOptions) -> Worker {
    let loaded = load(
        &tiny_hf(),
        &LoadOptions {
            dtype: DTypeChoice::F32,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    Worker::spawn(loaded, opts)
}

/// How many replies the conversation holds in memory, reset or not.
pub async fn stored_replies(
    store: &synthia_bot::memory::Store,
    key: &synthia_bot::chat::ConversationKey,
) -> usize {
    let conv = store
        .find_conversation(key)
        .await
        .unwrap()
        .expect("the conversation is stored");
    store
        .all_messages(conv.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.role == synthia_bot::chat::Role::Assistant)
        .count()
}
