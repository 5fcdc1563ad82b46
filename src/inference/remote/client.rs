//! One request to an OpenAI-compatible server: the raw-text completions body, what an answer
//! means (a stream, busy, a context refusal, a failure), and the stream's chunks.

use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::inference::SamplingParams;

/// What one completions request asks for.
pub(super) struct Completion<'a> {
    pub(super) model: &'a str,
    pub(super) prompt: &'a str,
    pub(super) max_tokens: usize,
    pub(super) sampling: &'a SamplingParams,
    pub(super) stop: &'a [String],
    pub(super) stream: bool,
}

impl Completion<'_> {
    /// The JSON body. Beyond OpenAI's fields it carries the sampling knobs llama.cpp
    /// (`top_k`, `min_p`, `repeat_penalty`) and vLLM (`top_k`, `repetition_penalty`) read, so a
    /// server samples as our own worker would; servers ignore names they do not know.
    pub(super) fn body(&self) -> Value {
        let s = self.sampling;
        let mut body = json!({
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": 0.0,
            "repeat_penalty": s.repetition_penalty,
            "repetition_penalty": s.repetition_penalty,
            "seed": s.seed,
            "stop": self.stop,
            "stream": self.stream,
        });
        if !self.model.is_empty() {
            body["model"] = Value::from(self.model);
        }
        body
    }
}

/// Why a request did not start streaming.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Refusal {
    /// 429 or 503: the server is up but full; wait as long as it asks.
    Busy { retry_after: Option<Duration> },
    /// The prompt does not fit the server's window (`None` when it did not say how large).
    Context { window: Option<usize> },
    /// Unreachable, timed out or failing (5xx): try another endpoint and probe this one.
    Down { kind: &'static str, message: String },
    /// Any other 4xx: a setting is wrong (key, model name); retrying will not help.
    Rejected { status: u16, message: String },
}

/// The opened stream of server-sent events.
pub(super) type Events = Pin<Box<dyn Stream<Item = Result<Chunk, String>> + Send>>;

/// One event of a completions stream.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Chunk {
    Text {
        text: String,
        finish: Option<String>,
    },
    /// `[DONE]`: the server ended the stream on purpose.
    Done,
}

/// Sends the request; a stream when the server accepted it.
pub(super) async fn open(
    client: &reqwest::Client,
    base: &str,
    api_key: &str,
    body: &Value,
) -> Result<reqwest::Response, Refusal> {
    let mut req = client.post(format!("{base}/completions")).json(body);
    if !api_key.is_empty() {
        req = req.bearer_auth(api_key);
    }
    let resp = req.send().await.map_err(|e| Refusal::Down {
        kind: if e.is_timeout() { "timeout" } else { "connect" },
        message: error_chain(&e),
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64);
    let text = resp.text().await.unwrap_or_default();
    Err(classify(status.as_u16(), retry_after, &text))
}

/// What an error status and its body mean.
pub(super) fn classify(status: u16, retry_after: Option<Duration>, body: &str) -> Refusal {
    if status == 429 || status == 503 {
        return Refusal::Busy { retry_after };
    }
    if let Some(window) = context_refusal(body) {
        return Refusal::Context { window };
    }
    let message = format!("HTTP {status}: {}", error_message(body));
    if status >= 500 {
        Refusal::Down {
            kind: "server_error",
            message,
        }
    } else {
        Refusal::Rejected { status, message }
    }
}

/// Whether a body refuses the prompt as too long for the window, and the window if it says:
/// llama.cpp's server (`exceed_context_size_error`, `n_ctx`), and the OpenAI wording vLLM and
/// llama-cpp-python use ("maximum context length is N tokens").
pub(super) fn context_refusal(body: &str) -> Option<Option<usize>> {
    let json: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let error = &json["error"];
    if error["type"] == "exceed_context_size_error" {
        return Some(error["n_ctx"].as_u64().map(|n| n as usize));
    }
    let message = error["message"]
        .as_str()
        .or_else(|| json["message"].as_str())
        .unwrap_or(body);
    let lower = message.to_ascii_lowercase();
    let at = lower
        .find("maximum context length is")
        .map(|i| i + "maximum context length is".len())
        .or_else(|| {
            (error["code"] == "context_length_exceeded" || lower.contains("context length"))
                .then_some(lower.len())
        })?;
    let digits: String = lower[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some(digits.parse().ok())
}

/// The `error.message` of an OpenAI-style body, else the body itself (shortened).
fn error_message(body: &str) -> String {
    let json: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let message = json["error"]["message"]
        .as_str()
        .or_else(|| json["error"].as_str())
        .or_else(|| json["detail"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| body.trim().to_string());
    message.chars().take(300).collect()
}

/// The chunks of an accepted stream.
pub(super) fn events(resp: reqwest::Response) -> Events {
    Box::pin(
        resp.bytes_stream()
            .eventsource()
            .map(|ev| match ev {
                Ok(ev) => parse_chunk(&ev.data),
                Err(e) => Err(format!("the stream broke: {e}")),
            })
            .filter_map(|c| async move { c.transpose() }),
    )
}

/// One event's data; `Ok(None)` for events without text (keep-alives, roles).
pub(super) fn parse_chunk(data: &str) -> Result<Option<Chunk>, String> {
    let data = data.trim();
    if data.is_empty() {
        return Ok(None);
    }
    if data == "[DONE]" {
        return Ok(Some(Chunk::Done));
    }
    let json: Value =
        serde_json::from_str(data).map_err(|e| format!("an event is not JSON ({e}): {data}"))?;
    if !json["error"].is_null() {
        return Err(format!("the server reported: {}", error_message(data)));
    }
    let choice = &json["choices"][0];
    if choice.is_null() {
        return Ok(None);
    }
    Ok(Some(Chunk::Text {
        text: choice["text"].as_str().unwrap_or_default().to_string(),
        finish: choice["finish_reason"].as_str().map(str::to_string),
    }))
}

/// An error and its causes, as one line (reqwest's own message omits the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_refusals_are_read_from_each_servers_wording() {
        let llama_server = r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error","n_prompt_tokens":5000,"n_ctx":4096}}"#;
        assert_eq!(context_refusal(llama_server), Some(Some(4096)));
        let openai = r#"{"error":{"message":"This model's maximum context length is 2048 tokens, however you requested 3000 tokens (2990 in your prompt; 10 for the completion).","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        assert_eq!(context_refusal(openai), Some(Some(2048)));
        let vllm = r#"{"object":"error","message":"This model's maximum context length is 8192 tokens. However, you requested 9000 tokens in the messages","type":"BadRequestError","code":400}"#;
        assert_eq!(context_refusal(vllm), Some(Some(8192)));
        let unsaid = r#"{"error":{"message":"prompt too long","code":"context_length_exceeded"}}"#;
        assert_eq!(context_refusal(unsaid), Some(None));
        assert_eq!(
            context_refusal(r#"{"error":{"message":"model not found"}}"#),
            None
        );
        assert_eq!(context_refusal("Internal Server Error"), None);
    }

    #[test]
    fn statuses_say_whether_to_wait_move_on_or_give_up() {
        assert_eq!(
            classify(429, Some(Duration::from_secs(2)), ""),
            Refusal::Busy {
                retry_after: Some(Duration::from_secs(2))
            }
        );
        assert!(matches!(
            classify(503, None, "loading"),
            Refusal::Busy { .. }
        ));
        assert!(matches!(
            classify(502, None, "bad gateway"),
            Refusal::Down {
                kind: "server_error",
                ..
            }
        ));
        match classify(401, None, r#"{"error":{"message":"invalid api key"}}"#) {
            Refusal::Rejected { status, message } => {
                assert_eq!(status, 401);
                assert!(message.contains("invalid api key"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            classify(
                400,
                None,
                r#"{"error":{"message":"This model's maximum context length is 256 tokens"}}"#
            ),
            Refusal::Context { window: Some(256) }
        );
    }

    #[test]
    fn stream_events_become_text_done_or_errors() {
        let ev = r#"{"id":"c","object":"text_completion","choices":[{"text":" Hello","index":0,"finish_reason":null}]}"#;
        assert_eq!(
            parse_chunk(ev).unwrap(),
            Some(Chunk::Text {
                text: " Hello".into(),
                finish: None
            })
        );
        let last = r#"{"choices":[{"text":"","index":0,"finish_reason":"length"}]}"#;
        assert_eq!(
            parse_chunk(last).unwrap(),
            Some(Chunk::Text {
                text: String::new(),
                finish: Some("length".into())
            })
        );
        assert_eq!(parse_chunk("[DONE]").unwrap(), Some(Chunk::Done));
        assert_eq!(parse_chunk("").unwrap(), None);
        assert_eq!(parse_chunk(r#"{"choices":[]}"#).unwrap(), None);
        assert!(
            parse_chunk(r#"{"error":{"message":"boom"}}"#)
                .unwrap_err()
                .contains("boom")
        );
        assert!(parse_chunk("not json").is_err());
    }

    #[test]
    fn the_body_carries_our_prompt_sampling_and_stops() {
        let sampling = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.1,
            repeat_last_n: 64,
            seed: 7,
        };
        let stop = vec!["\nUSER:".to_string()];
        let body = Completion {
            model: "synthia",
            prompt: "SYSTEM: s\nUSER: q\nASSISTANT:",
            max_tokens: 12,
            sampling: &sampling,
            stop: &stop,
            stream: true,
        }
        .body();
        assert_eq!(body["prompt"], "SYSTEM: s\nUSER: q\nASSISTANT:");
        assert_eq!(body["model"], "synthia");
        assert_eq!(body["max_tokens"], 12);
        assert_eq!(body["top_k"], 40);
        assert_eq!(body["seed"], 7);
        assert_eq!(body["stop"][0], "\nUSER:");
        assert_eq!(body["stream"], true);
        let unnamed = Completion {
            model: "",
            ..Completion {
                model: "",
                prompt: "p",
                max_tokens: 1,
                sampling: &sampling,
                stop: &stop,
                stream: false,
            }
        }
        .body();
        assert!(unnamed.get("model").is_none());
    }
}
