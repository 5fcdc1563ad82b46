//! Fetching `model.repo` from the Hugging Face hub into its local cache, once; later starts read
//! the cache.

use std::path::{Path, PathBuf};

use super::LoadError;
use super::safetensors::{INDEX_FILE, index_shards};
use crate::config::ModelSettings;

pub(super) struct Fetched {
    pub(super) path: PathBuf,
    pub(super) tokenizer: Option<PathBuf>,
}

/// Downloads (once; later starts use the local cache) what `model.repo` names.
pub(super) fn fetch_from_hub(settings: &ModelSettings) -> Result<Fetched, LoadError> {
    use hf_hub::{Repo, RepoType, api::sync::ApiBuilder};
    // HF_HOME (cache) and HF_ENDPOINT (mirror) are honoured as in the Python client.
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| LoadError::Hub {
            repo: settings.repo.clone(),
            file: String::new(),
            message: e.to_string(),
        })?;
    let revision = if settings.revision.is_empty() {
        "main"
    } else {
        &settings.revision
    };
    let repo = api.repo(Repo::with_revision(
        settings.repo.clone(),
        RepoType::Model,
        revision.to_string(),
    ));
    let get = |repo: &hf_hub::api::sync::ApiRepo, name: &str, repo_id: &str| {
        tracing::info!(
            repo = repo_id,
            file = name,
            "fetching from the Hugging Face hub (cached after the first time)"
        );
        repo.get(name).map_err(|e| LoadError::Hub {
            repo: repo_id.to_string(),
            file: name.to_string(),
            message: e.to_string(),
        })
    };
    if settings.file.to_ascii_lowercase().ends_with(".gguf") {
        let gguf = get(&repo, &settings.file, &settings.repo)?;
        let tokenizer = if settings.tokenizer_repo.is_empty() {
            get(&repo, "tokenizer.json", &settings.repo)?
        } else {
            let trepo = api.model(settings.tokenizer_repo.clone());
            get(&trepo, "tokenizer.json", &settings.tokenizer_repo)?
        };
        return Ok(Fetched {
            path: gguf,
            tokenizer: Some(tokenizer),
        });
    }
    let config = get(&repo, "config.json", &settings.repo)?;
    get(&repo, "tokenizer.json", &settings.repo)?;
    match get(&repo, INDEX_FILE, &settings.repo) {
        Ok(index) => {
            for shard in index_shards(&index)? {
                get(&repo, &shard, &settings.repo)?;
            }
        }
        Err(LoadError::Hub { .. }) => {
            get(&repo, "model.safetensors", &settings.repo)?;
        }
        Err(e) => return Err(e),
    }
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Fetched {
        path: dir,
        tokenizer: None,
    })
}
