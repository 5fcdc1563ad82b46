//! Fetching a repo from the Hugging Face hub into its local cache, once; later starts read the
//! cache and need no network. Before the large files are fetched, their sizes are asked of the
//! hub and checked against the free space, and each download reports its progress.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiRepo;
use hf_hub::{Cache, Repo, RepoType, api::sync::ApiBuilder};

use super::LoadError;
use super::progress::{Progress, Unit};
use super::safetensors::{INDEX_FILE, index_shards};
use super::space::ensure_room;
use crate::config::ModelSettings;

pub(super) struct Fetched {
    pub(super) path: PathBuf,
    pub(super) tokenizer: Option<PathBuf>,
    /// The commit the files are from.
    pub(super) revision: String,
    /// The repo's folder in the cache (`models--ORG--NAME`).
    pub(super) repo_cache: PathBuf,
}

struct Hub<'a> {
    api: hf_hub::api::sync::Api,
    cache: Cache,
    repo_id: &'a str,
    repo: Repo,
}

impl Hub<'_> {
    fn error(&self, repo: &str, file: &str, message: impl ToString) -> LoadError {
        LoadError::Hub {
            repo: repo.to_string(),
            file: file.to_string(),
            message: message.to_string(),
        }
    }

    fn cached(&self, repo: &Repo, name: &str) -> Option<PathBuf> {
        self.cache.repo(repo.clone()).get(name)
    }

    /// `name` from the cache, or downloaded with progress.
    fn get(&self, repo: &Repo, id: &str, name: &str) -> Result<PathBuf, LoadError> {
        if let Some(path) = self.cached(repo, name) {
            return Ok(path);
        }
        tracing::info!(
            repo = id,
            file = name,
            "fetching from the Hugging Face hub (cached after the first time)"
        );
        let progress = Progress::new(format!("downloading {name}"), 0, Unit::Bytes);
        self.api
            .repo(repo.clone())
            .download_with_progress(name, progress)
            .map_err(|e| self.error(id, name, e))
    }

    /// The sizes of the repo's files, as the hub lists them.
    fn remote_sizes(&self, repo: &ApiRepo) -> Result<HashMap<String, u64>, String> {
        let info: serde_json::Value = repo
            .info_request()
            .query("blobs", "true")
            .call()
            .map_err(|e| e.to_string())?
            .into_json()
            .map_err(|e| e.to_string())?;
        Ok(info["siblings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let name = s["rfilename"].as_str()?;
                let size = s["lfs"]["size"].as_u64().or_else(|| s["size"].as_u64())?;
                Some((name.to_string(), size))
            })
            .collect())
    }

    /// Refuses before downloading `names` (those not cached yet) when they do not fit.
    fn check_room(&self, repo: &Repo, names: &[String]) -> Result<(), LoadError> {
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| self.cached(repo, n).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let sizes = match self.remote_sizes(&self.api.repo(repo.clone())) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    repo = self.repo_id,
                    "cannot ask the hub for the download's size first: {e}"
                );
                return Ok(());
            }
        };
        let needed: u64 = missing.iter().filter_map(|n| sizes.get(*n)).sum();
        let dir = self.cache.path().join(repo.folder_name());
        ensure_room(&dir, needed, &format!("downloading {}", self.repo_id))
    }
}

/// One file of `repo_id` (at `model.revision`), from the cache or downloaded once.
pub(super) fn fetch_file(
    settings: &ModelSettings,
    repo_id: &str,
    name: &str,
) -> Result<PathBuf, LoadError> {
    let hub = hub_for(settings, repo_id)?;
    let repo = hub.repo.clone();
    hub.get(&repo, repo_id, name)
}

fn hub_for<'a>(settings: &ModelSettings, repo_id: &'a str) -> Result<Hub<'a>, LoadError> {
    // HF_HOME (cache) and HF_ENDPOINT (mirror) are honoured as in the Python client.
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| LoadError::Hub {
            repo: repo_id.to_string(),
            file: String::new(),
            message: e.to_string(),
        })?;
    let revision = if settings.revision.is_empty() {
        "main"
    } else {
        &settings.revision
    };
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    Ok(Hub {
        api,
        cache: Cache::from_env(),
        repo_id,
        repo,
    })
}

/// Fetches what `repo_id` (at `model.revision`) needs: `model.file` for a GGUF repo, else the
/// config, tokenizer and safetensors weights.
pub(super) fn fetch_from_hub(
    settings: &ModelSettings,
    repo_id: &str,
) -> Result<Fetched, LoadError> {
    let hub = hub_for(settings, repo_id)?;
    let repo = hub.repo.clone();
    if settings.file.to_ascii_lowercase().ends_with(".gguf") {
        hub.check_room(&repo, std::slice::from_ref(&settings.file))?;
        let gguf = hub.get(&repo, repo_id, &settings.file)?;
        let tokenizer = if settings.tokenizer_repo.is_empty() {
            hub.get(&repo, repo_id, "tokenizer.json")?
        } else {
            let trepo = Repo::new(settings.tokenizer_repo.clone(), RepoType::Model);
            hub.get(&trepo, &settings.tokenizer_repo, "tokenizer.json")?
        };
        return Ok(fetched(gguf, Some(tokenizer), &hub));
    }
    let config = hub.get(&repo, repo_id, "config.json")?;
    hub.get(&repo, repo_id, "tokenizer.json")?;
    let shards = match hub.get(&repo, repo_id, INDEX_FILE) {
        Ok(index) => index_shards(&index)?,
        Err(LoadError::Hub { .. }) => vec!["model.safetensors".to_string()],
        Err(e) => return Err(e),
    };
    hub.check_room(&repo, &shards)?;
    for shard in &shards {
        hub.get(&repo, repo_id, shard)?;
    }
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(fetched(dir, None, &hub))
}

/// The snapshot's commit and the repo's cache folder, read from where the cache put the files
/// (`models--ORG--NAME/snapshots/COMMIT/…`).
fn fetched(path: PathBuf, tokenizer: Option<PathBuf>, hub: &Hub<'_>) -> Fetched {
    let snapshot = if path.is_dir() {
        path.clone()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let revision = snapshot
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let repo_cache = snapshot
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| hub.cache.path().join(hub.repo.folder_name()));
    Fetched {
        path,
        tokenizer,
        revision,
        repo_cache,
    }
}
