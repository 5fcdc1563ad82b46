//! Where replies are generated: the in-process worker (the default) or OpenAI-compatible
//! inference servers (llama.cpp's server, vLLM, TGI, Ollama) reached over HTTP.
//!
//! The prompt, its budget and the tokenizer stay ours either way (`[model]` names the tokenizer
//! and the window); only the forward pass moves to the servers.

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The model loaded in this process, on its own inference thread.
    #[default]
    Local,
    /// The raw-text completions endpoint of OpenAI-compatible servers.
    Openai,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceSettings {
    pub backend: BackendChoice,
    /// Base URLs ending in the API version, e.g. `http://10.0.0.5:8000/v1`; requests go to the
    /// least busy one that is up.
    pub endpoints: Vec<String>,
    /// Bearer token the servers expect; set it through `SYNTHIA_BOT__INFERENCE__API_KEY`.
    pub api_key: String,
    /// The `model` the servers are asked for (vLLM and Ollama need it; llama.cpp ignores it).
    pub model: String,
    /// Seconds to connect to an endpoint before trying another.
    pub connect_timeout_s: u32,
    /// Seconds a stream may go without a chunk (the first included) before it counts as cut.
    pub idle_timeout_s: u32,
    /// Requests sent to one endpoint at once; more wait in our queue, fairly.
    pub max_in_flight: u32,
    /// Seconds a reply keeps waiting while the servers answer busy (429, 503) before it fails.
    pub busy_wait_s: u32,
}

impl Default for InferenceSettings {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Local,
            endpoints: Vec::new(),
            api_key: String::new(),
            model: String::new(),
            connect_timeout_s: 5,
            idle_timeout_s: 120,
            max_in_flight: 4,
            busy_wait_s: 300,
        }
    }
}

impl InferenceSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backend == BackendChoice::Openai && self.endpoints.is_empty() {
            return Err(ConfigError::new(
                "inference.endpoints",
                "backend = \"openai\" needs at least one server URL, e.g. [\"http://127.0.0.1:8080/v1\"]",
            ));
        }
        for (i, url) in self.endpoints.iter().enumerate() {
            check_endpoint(url)
                .map_err(|m| ConfigError::new(format!("inference.endpoints[{i}]"), m))?;
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::new(
                "inference.max_in_flight",
                "must be at least 1",
            ));
        }
        for (key, v) in [
            ("inference.connect_timeout_s", self.connect_timeout_s),
            ("inference.idle_timeout_s", self.idle_timeout_s),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be at least 1 second"));
            }
        }
        Ok(())
    }
}

/// An endpoint must be an absolute http(s) URL with a host and nothing after the path.
fn check_endpoint(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url.trim())
        .map_err(|e| format!("`{url}` is not a URL ({e}); write it as http://HOST:PORT/v1"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "`{url}` uses `{}`; only http:// and https:// servers are supported",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{url}` names no host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "`{url}` has a query or fragment; give the base URL only (…/v1)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(endpoints: &[&str]) -> InferenceSettings {
        InferenceSettings {
            backend: BackendChoice::Openai,
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            ..InferenceSettings::default()
        }
    }

    #[test]
    fn endpoints_are_checked_and_a_bad_one_is_named_by_its_place() {
        assert!(
            with(&["http://127.0.0.1:8080/v1", "https://gpu.example/v1"])
                .validate()
                .is_ok()
        );
        for (urls, key, words) in [
            (vec![], "inference.endpoints", "at least one"),
            (
                vec!["http://a/v1", "127.0.0.1:8080"],
                "inference.endpoints[1]",
                "127.0.0.1:8080",
            ),
            (vec!["ftp://host/v1"], "inference.endpoints[0]", "only http"),
            (vec!["not a url"], "inference.endpoints[0]", "is not a URL"),
            (vec!["http://h/v1?x=1"], "inference.endpoints[0]", "query"),
        ] {
            let err = with(&urls).validate().unwrap_err();
            assert_eq!(err.key, key, "{urls:?}");
            assert!(err.message.contains(words), "{urls:?}: {}", err.message);
        }
        // The local backend needs no endpoint.
        assert!(InferenceSettings::default().validate().is_ok());
        let zero = InferenceSettings {
            max_in_flight: 0,
            ..with(&["http://h/v1"])
        };
        assert_eq!(zero.validate().unwrap_err().key, "inference.max_in_flight");
    }
}
