//! The inference worker on real candle with a tiny random Llama and the real Llama-2 tokenizer.

mod common;

use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama as reference;
use synthia_bot::config::{CpuWeights, DTypeChoice, KvCacheDType, QuantizeChoice};
use synthia_bot::inference::kernels::quant::Loops;
use synthia_bot::inference::{
    FinishReason, GenerationEvent, GenerationRequest, LoadError, LoadOptions, SamplingParams,
    Worker, WorkerError, WorkerOptions, load,
};

/// f32 weights and f32 caches: our forward must equal candle's reference to 1e-4.
fn opts() -> LoadOptions {
    LoadOptions {
        dtype: DTypeChoice::F32,
        kv_cache: KvCacheDType::F32,
        ..LoadOptions::default()
    }
}

fn worker(path: &Path, wopts: WorkerOptions) -> Worker {
    Worker::spawn(load(path, &opts()).unwrap(), wopts)
}

fn request(conv: &str, prompt: Vec<u32>, max_new: usize) -> GenerationRequest {
    GenerationRequest {
        conversation: conv.into(),
        prompt,
        prompt_text: None,
        sampling: SamplingParams::greedy(),
        max_new_tokens: max_new,
        stop: Vec::new(),
    }
}

/// candle-transformers' own Llama on the same weights, recomputing everything on each call.
struct Reference {
    llama: reference::Llama,
    cfg: reference::Config,
}

impl Reference {
    fn load(dir: &Path) -> Self {
        let cfg: reference::LlamaConfig =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let cfg = cfg.into_config(false);
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
        }
        .unwrap();
        let llama = reference::Llama::load(vb, &cfg).unwrap();
        Self { llama, cfg }
    }

    /// Logits after the last of `tokens`, without any cache.
    fn logits(&self, tokens: &[u32]) -> Vec<f32> {
        let mut cache = reference::Cache::new(false, DType::F32, &self.cfg, &Device::Cpu).unwrap();
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        self.llama
            .forward(&input, 0, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }
}

/// Greedy ids computed by the reference, recomputing everything each step.
fn reference_greedy(dir: &Path, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let reference = Reference::load(dir);
    let mut tokens = prompt.to_vec();
    let mut out = Vec::new();
    let mut first_logits = Vec::new();
    for step in 0..n {
        let logits = reference.logits(&tokens);
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        if step == 0 {
            first_logits = logits;
        }
        out.push(next);
        if next == 2 {
            break;
        }
        tokens.push(next);
    }
    (out, first_logits)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn prompt_ids(text: &str) -> Vec<u32> {
    let loaded = load(&common::tiny_hf(), &opts()).unwrap();
    loaded.tokenizer.encode(text, true).unwrap()
}

/// Token ids of a greedy run, through our model with its cache, step by step.
fn our_greedy(path: &Path, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    greedy_of(&load(path, &opts()).unwrap(), prompt, n)
}

fn greedy_of(
    loaded: &synthia_bot::inference::LoadedModel,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<f32>) {
    let model = &loaded.model;
    let mut cache = model.new_cache();
    let mut logits = model.forward(prompt, &mut cache).unwrap();
    let first = logits.to_vec1::<f32>().unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = synthia_bot::inference::model::argmax(&logits).unwrap();
        out.push(next);
        if next == 2 {
            break;
        }
        logits = model.forward(&[next], &mut cache).unwrap();
    }
    (out, first)
}

#[test]
fn greedy_matches_candle_reference_without_cache() {
    let dir = common::tiny_hf();
    let prompt =
        prompt_ids("SYSTEM: You are Synthia.\nUSER: What is the capital of France?\nASSISTANT:");
    let (want, ref_logits) = reference_greedy(&dir, &prompt, 24);
    let (ours, our_logits) = our_greedy(&dir, &prompt, 24);
    assert!(max_abs_diff(&ref_logits, &our_logits) <= 1e-4);
    assert_eq!(ours, want);
    // Through the worker too, twice: deterministic.
    let w = worker(&dir, WorkerOptions::default());
    for conv in ["a", "b"] {
        let r = w
            .submit(request(conv, prompt.clone(), 24))
            .unwrap()
            .blocking_finish();
        let tok = w.tokenizer();
        let want_text = tok
            .decode(&want.iter().copied().filter(|&t| t != 2).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(r.text, want_text.trim(), "conversation {conv}");
        assert_eq!(r.completion_tokens, want.len());
    }
}

#[test]
fn f16_caches_take_half_the_memory_and_stay_close_to_the_reference() {
    let dir = common::tiny_hf();
    let half = load(
        &dir,
        &LoadOptions {
            dtype: DTypeChoice::F32,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let full = load(&dir, &opts()).unwrap();
    assert_eq!(
        half.model.cache_dtype(),
        DType::F16,
        "f16 is the CPU default"
    );
    assert_eq!(full.model.cache_dtype(), DType::F32);
    let reference = Reference::load(&dir);
    let mut tokens = prompt_ids("SYSTEM: You are Synthia.\nUSER: Name three rivers.\nASSISTANT:");
    let (mut c16, mut c32) = (half.model.new_cache(), full.model.new_cache());
    let mut l16 = half.model.forward(&tokens, &mut c16).unwrap();
    full.model.forward(&tokens, &mut c32).unwrap();
    // Every step's logits, prompt and decode, within a thousandth of their range.
    for step in 0..12 {
        let want = reference.logits(&tokens);
        let got = l16.to_vec1::<f32>().unwrap();
        let range = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= 1e-3 * range, "step {step}: {diff} of {range}");
        let next = synthia_bot::inference::model::argmax(&l16).unwrap();
        tokens.push(next);
        l16 = half.model.forward(&[next], &mut c16).unwrap();
        full.model.forward(&[next], &mut c32).unwrap();
    }
    assert_eq!(c16.len(), c32.len());
    assert_eq!(c16.bytes() * 2, c32.bytes(), "f16 takes half of f32");
}

#[test]
fn cached_follow_up_equals_full_recompute() {
    let dir = common::tiny_hf();
    let loaded = load(&dir, &opts()).unwrap();
    let model = &loaded.model;
    let first = prompt_ids("SYSTEM: sys\nUSER: Tell me about the sea.\nASSISTANT:");
    let mut cache = model.new_cache();
    model.forward(&first, &mut cache).unwrap();
    let mut follow = first.clone();
    follow.extend(prompt_ids("The sea is big.\nUSER: And rivers?\nASSISTANT:")[1..].iter());
    let (cached_logits, reused) = model.prefill(&follow, &mut cache, 512).unwrap();
    assert_eq!(reused, first.len());
    let mut fresh = model.new_cache();
    let full_logits = model.forward(&follow, &mut fresh).unwrap();
    let diff = max_abs_diff(
        &cached_logits.to_vec1().unwrap(),
        &full_logits.to_vec1().unwrap(),
    );
    assert!(diff <= 1e-4, "max abs diff {diff}");

    // A diverging prompt falls back to the common prefix and still matches a full recompute.
    let mut diverging = first[..first.len() - 3].to_vec();
    diverging.extend(prompt_ids("something else entirely")[1..].iter());
    let (div_logits, reused) = model.prefill(&diverging, &mut cache, 512).unwrap();
    assert_eq!(reused, first.len() - 3);
    let mut fresh = model.new_cache();
    let full = model.forward(&diverging, &mut fresh).unwrap();
    assert!(max_abs_diff(&div_logits.to_vec1().unwrap(), &full.to_vec1().unwrap()) <= 1e-4);

    // Chunked prefill equals one-shot prefill.
    let mut chunked = model.new_cache();
    let (chunk_logits, _) = model.prefill(&follow, &mut chunked, 7).unwrap();
    assert!(
        max_abs_diff(
            &chunk_logits.to_vec1().unwrap(),
            &full_logits.to_vec1().unwrap()
        ) <= 1e-4
    );
}

/// Prompt chunks attend in blocks of query rows against the keys each block sees: a prompt of
/// several blocks, in one chunk and in chunks that start between blocks and mid-block, gives
/// candle's reference logits.
#[test]
fn long_prompts_over_several_query_blocks_match_the_reference() {
    let dir = common::tiny_hf();
    let loaded = load(&dir, &opts()).unwrap();
    let model = &loaded.model;
    let text = "USER: Tell me everything about the sea, the rivers and the rain. ".repeat(20);
    let prompt = prompt_ids(&text);
    assert!(prompt.len() > 300, "{} tokens", prompt.len());
    let want = Reference::load(&dir).logits(&prompt);
    for chunk in [512, 200, 131] {
        let mut cache = model.new_cache();
        let (got, _) = model.prefill(&prompt, &mut cache, chunk).unwrap();
        let diff = max_abs_diff(&want, &got.to_vec1().unwrap());
        assert!(diff <= 1e-4, "chunks of {chunk}: max abs diff {diff}");
    }
}

#[test]
fn worker_reuses_a_conversations_cache_and_evicts_lru() {
    let dir = common::tiny_hf();
    let w = worker(&dir, WorkerOptions::default());
    let p1 = prompt_ids("SYSTEM: sys\nUSER: hello\nASSISTANT:");
    let r1 = w
        .submit(request("conv", p1.clone(), 8))
        .unwrap()
        .blocking_finish();
    assert_eq!(r1.reused_tokens, 0);
    let mut p2 = p1.clone();
    p2.extend(prompt_ids("hi\nUSER: more please\nASSISTANT:")[1..].iter());
    let cached = w
        .submit(request("conv", p2.clone(), 8))
        .unwrap()
        .blocking_finish();
    assert!(
        cached.reused_tokens >= p1.len() - 1,
        "reused {}",
        cached.reused_tokens
    );
    let fresh = w
        .submit(request("other", p2.clone(), 8))
        .unwrap()
        .blocking_finish();
    assert_eq!(fresh.reused_tokens, 0);
    assert_eq!(
        cached.text, fresh.text,
        "same greedy output with and without the cache"
    );

    // A budget that holds one conversation: the least recently used one is evicted.
    let shape = synthia_bot::bench::random_model::named_shape("tiny").unwrap();
    // Caches grow in 256-position blocks: room for one block, not two.
    let one = (shape.kv_bytes_per_token(DType::F32) * 384) as u64;
    let small = worker(
        &dir,
        WorkerOptions {
            kv_cache_budget_bytes: one,
            ..WorkerOptions::default()
        },
    );
    small
        .submit(request("a", p1.clone(), 4))
        .unwrap()
        .blocking_finish();
    small
        .submit(request("b", p1.clone(), 4))
        .unwrap()
        .blocking_finish();
    let a_again = small
        .submit(request("a", p1.clone(), 4))
        .unwrap()
        .blocking_finish();
    assert_eq!(a_again.reused_tokens, 0, "a was evicted when b was kept");
    let a_third = small
        .submit(request("a", p1.clone(), 4))
        .unwrap()
        .blocking_finish();
    assert_eq!(
        a_third.reused_tokens,
        p1.len() - 1,
        "a is now the resident one"
    );
}

#[test]
fn cancellation_is_prompt_and_dropping_cancels() {
    let dir = common::tiny_hf();
    let w = worker(&dir, WorkerOptions::default());
    let prompt = prompt_ids("SYSTEM: sys\nUSER: write a very long story\nASSISTANT:");
    let mut h = w.submit(request("c", prompt.clone(), 3000)).unwrap();
    let mut started = false;
    while let Some(ev) = h.blocking_next() {
        match ev {
            GenerationEvent::Started { .. } => started = true,
            GenerationEvent::Delta(_) => break,
            GenerationEvent::Finished(r) => panic!("finished before cancel: {r:?}"),
            GenerationEvent::Queued { .. } => {}
        }
    }
    assert!(started);
    h.cancel();
    let r = h.blocking_finish();
    assert_eq!(r.finish, FinishReason::Cancelled);
    assert!(r.completion_tokens < 3000);

    // Dropping a handle cancels its generation: the next request starts soon after.
    let dropped = w.submit(request("d", prompt.clone(), 3000)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(dropped);
    let next = w.submit(request("e", prompt, 2)).unwrap().blocking_finish();
    assert_eq!(next.finish, FinishReason::Length);
    assert!(next.queue_time < Duration::from_secs(60));
}

#[test]
fn full_queue_is_busy_and_service_is_round_robin() {
    let dir = common::tiny_hf();
    let w = worker(
        &dir,
        WorkerOptions {
            queue_capacity: 5,
            start_paused: true,
            ..WorkerOptions::default()
        },
    );
    let prompt = prompt_ids("USER: hi\nASSISTANT:");
    let names = ["a1", "a2", "a3", "b1", "c1"];
    let mut handles = Vec::new();
    for name in names {
        handles.push((
            name,
            w.submit(request(&name[..1], prompt.clone(), 2)).unwrap(),
        ));
    }
    match w.submit(request("d", prompt.clone(), 2)) {
        Err(e @ WorkerError::Busy { .. }) => assert!(e.is_retryable()),
        Err(e) => panic!("expected busy, got {e}"),
        Ok(_) => panic!("expected busy, got a handle"),
    }
    let positions: Vec<usize> = handles.iter().map(|(_, h)| h.queue_position()).collect();
    assert_eq!(
        positions,
        vec![1, 4, 5, 2, 3],
        "round-robin places for a1 a2 a3 b1 c1"
    );
    w.resume();
    let mut order: Vec<(u64, &str)> = Vec::new();
    for (name, mut h) in handles {
        while let Some(ev) = h.blocking_next() {
            if let GenerationEvent::Started { serial } = ev {
                order.push((serial, name));
            }
            if let GenerationEvent::Finished(r) = ev {
                assert_eq!(r.finish, FinishReason::Length);
                break;
            }
        }
    }
    order.sort();
    let served: Vec<&str> = order.iter().map(|(_, n)| *n).collect();
    assert_eq!(served, vec!["a1", "b1", "c1", "a2", "a3"]);
}

#[test]
fn stop_text_never_reaches_a_delta_and_deltas_are_whole_characters() {
    let dir = common::tiny_hf();
    let w = worker(&dir, WorkerOptions::default());
    let tok = w.tokenizer();
    // Teacher-force: find what the model says, then make part of it a stop string.
    let prompt = prompt_ids("SYSTEM: sys\nUSER: hello\nASSISTANT:");
    let free = w
        .submit(request("s", prompt.clone(), 16))
        .unwrap()
        .blocking_finish();
    assert!(
        free.text.chars().count() > 6,
        "model output {:?}",
        free.text
    );
    let chars: Vec<char> = free.text.chars().collect();
    let stop: String = chars[3..6].iter().collect();
    let mut req = request("s2", prompt.clone(), 16);
    req.stop = vec![stop.clone()];
    let mut h = w.submit(req).unwrap();
    let mut deltas = Vec::new();
    let result = loop {
        match h.blocking_next().unwrap() {
            GenerationEvent::Delta(d) => deltas.push(d),
            GenerationEvent::Finished(r) => break r,
            _ => {}
        }
    };
    assert_eq!(result.finish, FinishReason::Stop);
    let shown = deltas.concat();
    assert_eq!(shown, result.text);
    assert!(!shown.contains(&stop));
    assert!(free.text.starts_with(&shown));
    for d in &deltas {
        assert!(!d.contains('\u{FFFD}'), "split character in {d:?}");
    }
    // The streaming decoder never splits a character that spans byte-fallback tokens.
    let text = "héllo 👋 日本語 ✓";
    let ids = tok.encode(text, false).unwrap();
    let mut stream = tok.inner().decode_stream(true);
    let mut pieces = String::new();
    for id in ids {
        if let Some(p) = stream.step(id).unwrap() {
            assert!(!p.contains('\u{FFFD}'), "{p:?}");
            pieces.push_str(&p);
        }
    }
    assert_eq!(pieces.trim_start(), text);
}

#[test]
fn prompts_past_the_context_are_refused() {
    let dir = common::tiny_hf();
    let w = worker(
        &dir,
        WorkerOptions {
            context_length: 64,
            ..WorkerOptions::default()
        },
    );
    let long = vec![1u32; 64];
    assert!(matches!(
        w.submit(request("x", long, 4)),
        Err(WorkerError::PromptTooLong {
            tokens: 64,
            context: 64
        })
    ));
    // A prompt near the end stops at the window, never past it.
    let near = [vec![1u32], vec![450u32; 60]].concat();
    let r = w.submit(request("y", near, 100)).unwrap().blocking_finish();
    assert_eq!(r.finish, FinishReason::Length);
    assert!(r.prompt_tokens + r.completion_tokens <= 64, "{r:?}");
}

#[test]
fn gguf_and_sharded_models_load_and_agree() {
    let prompt = prompt_ids("SYSTEM: sys\nUSER: hi there\nASSISTANT:");
    let (st_ids, st_logits) = our_greedy(&common::tiny_hf(), &prompt, 12);
    let (sh_ids, sh_logits) = our_greedy(&common::tiny_sharded(), &prompt, 12);
    assert_eq!(sh_ids, st_ids);
    assert!(max_abs_diff(&sh_logits, &st_logits) == 0.0);

    // F32 GGUF: the same weights with llama.cpp's q/k layout give the same logits.
    let (gg_ids, gg_logits) = our_greedy(&common::tiny_gguf("f32"), &prompt, 12);
    assert!(
        max_abs_diff(&gg_logits, &st_logits) <= 1e-3,
        "{}",
        max_abs_diff(&gg_logits, &st_logits)
    );
    assert_eq!(gg_ids, st_ids);

    // Quantised GGUF: our forward equals candle-transformers' quantized llama on the same file
    // (for Q8_0 through our kernels see below), with either way of multiplying the quantised
    // weights: candle's repacked kernels, or ours on the stored blocks (where this CPU runs ours).
    let ours_run = Loops::detected() != Loops::Portable;
    for (preset, mode) in [
        ("q8_0", CpuWeights::Repacked),
        ("q8_0", CpuWeights::Compact),
        ("q4_k_m", CpuWeights::Repacked),
        ("q4_k_m", CpuWeights::Compact),
    ] {
        let path = common::tiny_gguf(preset);
        let loaded = load(
            &path,
            &LoadOptions {
                cpu_weights: mode,
                ..opts()
            },
        )
        .unwrap();
        let compact = mode == CpuWeights::Compact && ours_run;
        assert_eq!(loaded.model.compact_weights(), compact, "{preset} {mode:?}");
        let (ids, logits) = greedy_of(&loaded, &prompt, 12);
        assert!(!ids.is_empty());
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let mut weights = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )
        .unwrap();
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = weights
            .forward(&input, 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let diff = max_abs_diff(&want, &logits);
        if preset == "q8_0" && compact {
            // Q8_0 weights meet activations quantised per 32 values (as llama.cpp does); candle
            // quantises them per 32 or, in its repacked AVX-512 kernels, per 256, depending on
            // the CPU. So ours equals candle's, or is no further from the unquantised model.
            let ours = max_abs_diff(&logits, &st_logits);
            let theirs = max_abs_diff(&want, &st_logits);
            assert!(
                diff <= 1e-3 || ours <= 1.1 * theirs,
                "{preset} {mode:?}: {diff} from candle's, {ours} from f32 (candle's: {theirs})"
            );
        } else {
            assert!(diff <= 1e-3, "{preset} {mode:?}: {diff}");
        }
        let w = worker(&path, WorkerOptions::default());
        let r = w
            .submit(request("g", prompt.clone(), 8))
            .unwrap()
            .blocking_finish();
        assert!(
            matches!(r.finish, FinishReason::Length | FinishReason::Eos),
            "{preset}: {r:?}"
        );
    }
}

fn load_err(path: &Path) -> String {
    match load(path, &opts()) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn broken_models_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "missing config",
            Box::new(|d| std::fs::remove_file(d.join("config.json")).unwrap()),
            "config.json",
        ),
        (
            "missing tokenizer",
            Box::new(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap()),
            "tokenizer.json",
        ),
        (
            "missing weights",
            Box::new(|d| std::fs::remove_file(d.join("model.safetensors")).unwrap()),
            "no model.safetensors",
        ),
        (
            "missing tensor",
            Box::new(|d| edit_config(d, |v| v["num_hidden_layers"] = 3.into())),
            "missing tensor `model.layers.2.input_layernorm.weight`",
        ),
        (
            "wrong shape",
            Box::new(|d| edit_config(d, |v| v["intermediate_size"] = 1024.into())),
            "tensor `model.layers.0.mlp.gate_proj.weight` has shape [512, 256], expected [1024, 256]",
        ),
        (
            "unsupported architecture",
            Box::new(|d| {
                edit_config(d, |v| {
                    v["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
                })
            }),
            "unsupported architecture `GPT2LMHeadModel`",
        ),
        (
            "vocab mismatch",
            Box::new(|d| edit_config(d, |v| v["vocab_size"] = 1000.into())),
            "the tokenizer has 32000 tokens but the model only 1000",
        ),
        (
            "garbage config",
            Box::new(|d| std::fs::write(d.join("config.json"), "{not json").unwrap()),
            "not a valid model config",
        ),
        (
            "truncated weights",
            Box::new(|d| std::fs::write(d.join("model.safetensors"), b"12345678").unwrap()),
            "model.safetensors",
        ),
    ];
    for (i, (name, breakit, needle)) in cases.iter().enumerate() {
        let dir = common::broken_copy(&tmp.path().join(i.to_string()));
        breakit(&dir);
        let err = load_err(&dir);
        assert!(err.contains(needle), "{name}: {err}");
    }
    assert!(
        load_err(Path::new("/nonexistent/model")).contains("/nonexistent/model does not exist")
    );
    let bad_gguf = tmp.path().join("bad.gguf");
    std::fs::write(&bad_gguf, b"GGUFnot really").unwrap();
    assert!(load_err(&bad_gguf).contains("bad.gguf"));
    let cuda = load(
        &common::tiny_hf(),
        &LoadOptions {
            device: synthia_bot::config::DeviceChoice::Cuda,
            ..opts()
        },
    );
    if !cfg!(feature = "cuda") {
        assert!(matches!(cuda, Err(LoadError::Device(_))));
    }
}

/// Greedy outputs of each prompt decoded alone (one conversation at a time).
fn alone(path: &Path, prompts: &[Vec<u32>], max_new: usize) -> Vec<Vec<u32>> {
    let w = worker(
        path,
        WorkerOptions {
            max_batch: 1,
            ..WorkerOptions::default()
        },
    );
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            w.submit(request(&format!("alone-{i}"), p.clone(), max_new))
                .unwrap()
                .blocking_finish()
                .tokens
        })
        .collect()
}

fn five_prompts() -> Vec<Vec<u32>> {
    [
        "SYSTEM: sys\nUSER: hi\nASSISTANT:",
        "SYSTEM: You are Synthia.\nUSER: Tell me about rivers and the sea, at length please.\nASSISTANT:",
        "USER: 2+2?\nASSISTANT:",
        "SYSTEM: sys\nUSER: one\nASSISTANT: two\nUSER: three\nASSISTANT: four\nUSER: five\nASSISTANT:",
        "Once",
    ]
    .iter()
    .map(|t| prompt_ids(t))
    .collect()
}

#[test]
fn batched_decoding_equals_decoding_alone() {
    let prompts = five_prompts();
    for path in [common::tiny_hf(), common::tiny_gguf("q8_0")] {
        let want = alone(&path, &prompts, 20);
        let w = worker(
            &path,
            WorkerOptions {
                start_paused: true,
                max_batch: 8,
                prefill_chunk: 16,
                ..WorkerOptions::default()
            },
        );
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                w.submit(request(&format!("together-{i}"), p.clone(), 20))
                    .unwrap()
            })
            .collect();
        w.resume();
        let got: Vec<Vec<u32>> = handles
            .into_iter()
            .map(|h| h.blocking_finish().tokens)
            .collect();
        assert_eq!(got, want, "{}", path.display());
        assert!(got.iter().all(|t| !t.is_empty()));
    }
}

#[test]
fn joining_and_cancelled_requests_leave_the_others_unchanged() {
    let dir = common::tiny_hf();
    let prompts = five_prompts();
    let want = alone(&dir, &prompts[..4], 24);
    let w = worker(&dir, WorkerOptions::default());
    let mut a = w.submit(request("a", prompts[0].clone(), 24)).unwrap();
    let b = w.submit(request("b", prompts[1].clone(), 500)).unwrap();
    let c = w.submit(request("c", prompts[2].clone(), 24)).unwrap();
    // Once `a` is streaming, `d` joins mid-way and `b` is cancelled mid-way.
    let mut a_tokens_seen = false;
    while let Some(ev) = a.blocking_next() {
        if let GenerationEvent::Delta(_) = ev {
            a_tokens_seen = true;
            break;
        }
        assert!(!matches!(ev, GenerationEvent::Finished(_)));
    }
    assert!(a_tokens_seen);
    let d = w.submit(request("d", prompts[3].clone(), 24)).unwrap();
    b.cancel();
    let rb = b.blocking_finish();
    assert_eq!(rb.finish, FinishReason::Cancelled);
    assert!(rb.completion_tokens < 500);
    assert_eq!(a.blocking_finish().tokens, want[0]);
    assert_eq!(c.blocking_finish().tokens, want[2]);
    assert_eq!(d.blocking_finish().tokens, want[3]);
}

#[test]
fn batched_forward_rows_equal_the_candle_reference() {
    let dir = common::tiny_hf();
    let loaded = load(&dir, &opts()).unwrap();
    let model = &loaded.model;
    let prompts = five_prompts();
    let reference = Reference::load(&dir);
    let reference_logits = |tokens: &[u32]| reference.logits(tokens);
    // A mixed step: three prompts of different lengths read together.
    let mut caches: Vec<_> = (0..3).map(|_| model.new_cache()).collect();
    let logits = {
        let mut items: Vec<_> = caches
            .iter_mut()
            .zip(&prompts)
            .map(|(cache, p)| synthia_bot::inference::model::BatchItem { tokens: p, cache })
            .collect();
        model.forward_batch(&mut items).unwrap()
    };
    for (row, p) in prompts.iter().take(3).enumerate() {
        let diff = max_abs_diff(
            &logits.get(row).unwrap().to_vec1().unwrap(),
            &reference_logits(p),
        );
        assert!(diff <= 1e-4, "prefill row {row}: {diff}");
    }
    // A decode step: each sequence at its own position.
    let next: Vec<[u32; 1]> = (0..3).map(|i| [100 + i as u32 * 7]).collect();
    let logits = {
        let mut items: Vec<_> = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, t)| synthia_bot::inference::model::BatchItem { tokens: t, cache })
            .collect();
        model.forward_batch(&mut items).unwrap()
    };
    for row in 0..3 {
        let full: Vec<u32> = prompts[row].iter().copied().chain(next[row]).collect();
        let diff = max_abs_diff(
            &logits.get(row).unwrap().to_vec1().unwrap(),
            &reference_logits(&full),
        );
        assert!(diff <= 1e-4, "decode row {row}: {diff}");
    }
}

#[test]
fn chunked_prefill_in_the_worker_equals_one_shot() {
    let dir = common::tiny_hf();
    let long = prompt_ids(&"SYSTEM: sys\nUSER: a long question about many things ".repeat(12));
    let one_shot = worker(&dir, WorkerOptions::default());
    let chunked = worker(
        &dir,
        WorkerOptions {
            prefill_chunk: 7,
            ..WorkerOptions::default()
        },
    );
    let a = one_shot
        .submit(request("x", long.clone(), 12))
        .unwrap()
        .blocking_finish();
    let b = chunked
        .submit(request("x", long, 12))
        .unwrap()
        .blocking_finish();
    assert_eq!(a.tokens, b.tokens);
    assert!(!a.tokens.is_empty());
}

fn mtime(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

/// Every tensor of `a` is in `b` with the same type, shape and bytes, in the same order.
fn assert_same_tensors(a: &Path, b: &Path) {
    use candle_core::quantized::gguf_file::Content;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (ca, cb) = (
        Content::read(&mut fa).unwrap(),
        Content::read(&mut fb).unwrap(),
    );
    let mut names: Vec<&String> = ca.tensor_infos.keys().collect();
    names.sort();
    let mut other: Vec<&String> = cb.tensor_infos.keys().collect();
    other.sort();
    assert_eq!(names, other);
    for name in names {
        let ta = ca.tensor(&mut fa, name, &Device::Cpu).unwrap();
        let tb = cb.tensor(&mut fb, name, &Device::Cpu).unwrap();
        assert_eq!(ta.dtype(), tb.dtype(), "{name}");
        assert_eq!(ta.shape(), tb.shape(), "{name}");
        assert!(
            ta.data().unwrap() == tb.data().unwrap(),
            "{name}: bytes differ"
        );
    }
}

#[test]
fn safetensors_quantised_at_load_equal_our_gguf_files_and_are_written_once() {
    let prompt = prompt_ids("SYSTEM: You are Synthia.\nUSER: Name three colours.\nASSISTANT:");
    let cache = tempfile::tempdir().unwrap();
    for (choice, preset) in [
        (QuantizeChoice::Q8_0, "q8_0"),
        (QuantizeChoice::Q4KM, "q4_k_m"),
    ] {
        let qopts = LoadOptions {
            quantize: choice,
            quantized_dir: cache.path().to_path_buf(),
            ..opts()
        };
        let first = load(&common::tiny_hf(), &qopts).unwrap();
        let copy = first.quantized.clone().expect("quantised at load");
        assert!(!copy.reused, "{preset}: the first load writes the copy");
        assert!(
            copy.file.starts_with(cache.path()),
            "{}",
            copy.file.display()
        );
        assert!(copy.file.to_string_lossy().contains(preset));
        let written = mtime(&copy.file);
        // The tensors are those our writer puts in a GGUF of that type, byte for byte, and
        // the greedy ids are the same.
        assert_same_tensors(&copy.file, &common::tiny_gguf(preset));
        let want = greedy_of(
            &load(&common::tiny_gguf(preset), &opts()).unwrap(),
            &prompt,
            16,
        )
        .0;
        assert_eq!(greedy_of(&first, &prompt, 16).0, want, "{preset}");
        drop(first);
        std::thread::sleep(Duration::from_millis(20));
        let second = load(&common::tiny_hf(), &qopts).unwrap();
        let again = second.quantized.clone().unwrap();
        assert!(again.reused, "{preset}: the second load reuses the copy");
        assert_eq!(again.file, copy.file);
        assert_eq!(mtime(&copy.file), written, "{preset}: not written again");
        assert_eq!(greedy_of(&second, &prompt, 16).0, want);
    }
    let files = |dir: &Path| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    assert_eq!(files(cache.path()).len(), 2, "one copy per quantisation");

    // A changed source writes a new copy instead of reusing the old one.
    let source = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::tiny_hf()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), source.path().join(entry.file_name())).unwrap();
    }
    let qopts = LoadOptions {
        quantize: QuantizeChoice::Q8_0,
        quantized_dir: cache.path().to_path_buf(),
        ..opts()
    };
    let before = load(source.path(), &qopts).unwrap().quantized.unwrap();
    assert!(!before.reused);
    let config = source.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n")).unwrap();
    let after = load(source.path(), &qopts).unwrap().quantized.unwrap();
    assert!(!after.reused, "a changed config is a new revision");
    assert_ne!(after.file, before.file);
    // CUDA is the only place `auto` leaves the weights dense; on the CPU it quantises.
    let auto = load(
        source.path(),
        &LoadOptions {
            quantize: QuantizeChoice::Auto,
            ..qopts.clone()
        },
    )
    .unwrap();
    assert!(
        auto.quantized
            .unwrap()
            .file
            .to_string_lossy()
            .contains("q4_k_m")
    );
}
