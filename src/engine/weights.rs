//! Finding a preset's files on disk, and fetching them from the Hugging Face Hub.
//!
//! Loading never downloads: a worker that silently pulls 5 GB on start-up (or falls back to
//! something else when offline) hides an operator mistake. Missing files are one error naming
//! the repo, the revision, every missing file and the command that fetches them;
//! `popcon-worker models fetch NAME` is the only path that touches the network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::EngineError;
use super::preset::{ModelPreset, ModelSource};

/// Something whose files are pinned to one source: a model preset, or an animation preset's
/// motion adapter. Locating and fetching work the same for both.
pub trait Pinned {
    /// The name `models fetch` takes.
    fn name(&self) -> &str;
    fn source(&self) -> &ModelSource;
    /// Every file read, relative to the source's root.
    fn files(&self) -> Vec<String>;
}

impl Pinned for ModelPreset {
    fn name(&self) -> &str {
        &self.name
    }
    fn source(&self) -> &ModelSource {
        &self.source
    }
    fn files(&self) -> Vec<String> {
        ModelPreset::files(self)
    }
}

/// Absolute paths of every file a preset needs, keyed by their path inside the repo.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    files: BTreeMap<String, PathBuf>,
}

impl ModelFiles {
    /// Path of `rel` (as listed by [`ModelPreset::files`]).
    pub fn path(&self, rel: &str) -> Result<&Path, EngineError> {
        self.files
            .get(rel)
            .map(PathBuf::as_path)
            .ok_or_else(|| EngineError::Config {
                path: PathBuf::from(rel),
                message: "not among the preset's files".into(),
            })
    }

    /// Folder that holds `rel`'s parent component (for `tokenizer/` and the like).
    pub fn dir_of(&self, rel: &str) -> Result<&Path, EngineError> {
        let p = self.path(rel)?;
        p.parent().ok_or_else(|| EngineError::Config {
            path: p.to_path_buf(),
            message: "has no parent folder".into(),
        })
    }

    /// Resolves every file of `preset`: from `override_dir` when given (a diffusers folder such
    /// as a `git clone` of the repo), else the preset's local folder under `models_dir`, else
    /// the Hugging Face cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
    pub fn locate<P: Pinned + ?Sized>(
        preset: &P,
        models_dir: &Path,
        override_dir: Option<&Path>,
    ) -> Result<Self, EngineError> {
        Self::locate_with_cache(preset, models_dir, override_dir, &hub_cache_dir())
    }

    /// [`ModelFiles::locate`] with an explicit Hugging Face cache folder.
    pub fn locate_with_cache<P: Pinned + ?Sized>(
        preset: &P,
        models_dir: &Path,
        override_dir: Option<&Path>,
        hub_cache: &Path,
    ) -> Result<Self, EngineError> {
        let wanted = preset.files();
        let (found, missing): (Vec<_>, Vec<_>) = match (override_dir, preset.source()) {
            (Some(dir), _) => split_existing(&wanted, |f| Some(dir.join(f))),
            (None, ModelSource::Local { dir }) => {
                let root = models_dir.join(dir);
                split_existing(&wanted, |f| Some(root.join(f)))
            }
            (None, ModelSource::Hub { repo, revision }) => {
                let snapshot = hub_snapshot_dir(hub_cache, repo, revision);
                split_existing(&wanted, |f| snapshot.as_ref().map(|s| s.join(f)))
            }
        };
        if !missing.is_empty() {
            let (origin, how) = match (override_dir, preset.source()) {
                (Some(dir), _) => (
                    dir.display().to_string(),
                    "point --model-dir at a complete diffusers folder".to_string(),
                ),
                (None, ModelSource::Local { dir }) => (
                    models_dir.join(dir).display().to_string(),
                    "run `python3 scripts/make_tiny_model.py` and \
                     `python3 scripts/make_tiny_motion.py` (see their headers) to rebuild it"
                        .to_string(),
                ),
                (None, ModelSource::Hub { repo, revision }) => (
                    format!("{repo}@{revision} in {}", hub_cache.display()),
                    format!("run `popcon-worker models fetch {}`", preset.name()),
                ),
            };
            return Err(EngineError::MissingWeights {
                model: preset.name().to_string(),
                origin,
                missing,
                how,
            });
        }
        Ok(Self {
            files: found.into_iter().collect(),
        })
    }
}

fn split_existing(
    wanted: &[String],
    path_of: impl Fn(&str) -> Option<PathBuf>,
) -> (Vec<(String, PathBuf)>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for f in wanted {
        match path_of(f) {
            Some(p) if p.is_file() => found.push((f.clone(), p)),
            _ => missing.push(f.clone()),
        }
    }
    (found, missing)
}

/// `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (the layout hf-hub and huggingface_hub share).
pub fn hub_cache_dir() -> PathBuf {
    hf_hub::Cache::from_env().path().clone()
}

/// The snapshot folder of `repo` at `revision`: a commit hash names its folder directly (the
/// Python client writes no ref for it); a branch or tag is looked up in `refs/`.
fn hub_snapshot_dir(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let base = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        std::fs::read_to_string(base.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    Some(base.join("snapshots").join(commit))
}

/// Downloads every file of a hub preset into the Hugging Face cache (progress bars on a
/// terminal). Returns the files' paths. Honors `HF_HOME`, `HF_ENDPOINT` and the cached token.
pub fn fetch<P: Pinned + ?Sized>(preset: &P, progress: bool) -> Result<ModelFiles, EngineError> {
    let (repo, revision) = match preset.source() {
        ModelSource::Hub { repo, revision } => (repo.clone(), revision.clone()),
        ModelSource::Local { dir } => {
            return Err(EngineError::InvalidRequest(format!(
                "model `{}` is a local folder (`{dir}` under the models directory); nothing to fetch",
                preset.name()
            )));
        }
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(progress)
        .build()
        .map_err(|e| EngineError::Download {
            repo: repo.clone(),
            file: String::new(),
            message: e.to_string(),
        })?;
    let handle = api.repo(hf_hub::Repo::with_revision(
        repo.clone(),
        hf_hub::RepoType::Model,
        revision,
    ));
    let mut files = BTreeMap::new();
    for f in preset.files() {
        let path = handle.get(&f).map_err(|e| EngineError::Download {
            repo: repo.clone(),
            file: f.clone(),
            message: e.to_string(),
        })?;
        files.insert(f, path);
    }
    Ok(ModelFiles { files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::preset::PresetRegistry;

    #[test]
    fn missing_hub_weights_name_repo_files_and_the_fetch_command() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = PresetRegistry::load(Path::new("/nonexistent")).unwrap();
        let preset = reg.get("sd-turbo").unwrap();
        let err =
            ModelFiles::locate_with_cache(preset, Path::new("/nonexistent"), None, tmp.path())
                .unwrap_err()
                .to_string();
        assert!(err.contains("stabilityai/sd-turbo@b261bac6"), "{err}");
        assert!(
            err.contains("unet/diffusion_pytorch_model.fp16.safetensors"),
            "{err}"
        );
        assert!(err.contains("popcon-worker models fetch sd-turbo"), "{err}");
    }

    #[test]
    fn a_cached_snapshot_is_found_by_commit_and_by_ref() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("models--org--m");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(base.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(base.join("refs")).unwrap();
        std::fs::write(base.join("refs/main"), format!("{commit}\n")).unwrap();
        let by_commit = hub_snapshot_dir(tmp.path(), "org/m", commit).unwrap();
        let by_ref = hub_snapshot_dir(tmp.path(), "org/m", "main").unwrap();
        assert_eq!(by_commit, by_ref);
        assert!(hub_snapshot_dir(tmp.path(), "org/m", "dev").is_none());
    }

    #[test]
    fn the_tiny_model_resolves_from_the_models_folder() {
        let dir = PresetRegistry::default_models_dir();
        let reg = PresetRegistry::load(&dir).unwrap();
        let files = ModelFiles::locate(reg.get("tiny").unwrap(), &dir, None).unwrap();
        assert!(files.path("unet/config.json").unwrap().is_file());
        assert!(
            files
                .dir_of("tokenizer/vocab.json")
                .unwrap()
                .ends_with("tokenizer")
        );
    }
}
