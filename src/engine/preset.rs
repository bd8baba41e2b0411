//! Model presets: which weights a model name means and how to run it.
//!
//! A preset is a small TOML file in `models/` (the shipped ones are also compiled into the
//! binary, so a deployed worker needs no source tree to know them). It pins where the weights
//! come from — a Hugging Face repo at a revision, or a local folder for the tiny test model —
//! the architecture, the files to fetch, and the defaults a request falls back to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::EngineError;

/// Presets compiled into the binary; a file of the same name in the models folder wins.
const EMBEDDED: &[(&str, &str)] = &[
    ("sd-turbo", include_str!("../../models/sd-turbo.toml")),
    ("sdxl-turbo", include_str!("../../models/sdxl-turbo.toml")),
    ("sd15", include_str!("../../models/sd15.toml")),
    ("tiny", include_str!("../../models/tiny.toml")),
    ("tiny-sd15", include_str!("../../models/tiny-sd15.toml")),
];

/// The family of the checkpoint: decides the text encoders and how their outputs are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// SD 1.x: one CLIP ViT-L encoder, last hidden state.
    Sd15,
    /// SD 2.x (and sd-turbo): one OpenCLIP encoder already truncated to the penultimate layer.
    Sd2,
    /// SDXL (and sdxl-turbo): two encoders, penultimate layers concatenated.
    Sdxl,
}

/// The denoising algorithm. Betas, timestep spacing and prediction type come from the repo's
/// `scheduler/scheduler_config.json`; the preset picks the algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    EulerAncestral,
    Euler,
    Ddim,
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "euler_ancestral" | "euler-ancestral" | "euler_a" => Ok(Self::EulerAncestral),
            "euler" => Ok(Self::Euler),
            "ddim" => Ok(Self::Ddim),
            other => Err(format!(
                "unknown scheduler `{other}` (expected euler_ancestral, euler or ddim)"
            )),
        }
    }
}

/// Where a preset's files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face model repo at a pinned revision, fetched with `models fetch`.
    Hub { repo: String, revision: String },
    /// A folder relative to the models directory (the tiny model ships in the repo).
    Local { dir: String },
}

/// Weight files per component, relative to the model root.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WeightFiles {
    pub text_encoder: String,
    #[serde(default)]
    pub text_encoder_2: Option<String>,
    pub unet: String,
    pub vae: String,
}

/// Defaults a request falls back to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PresetDefaults {
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    /// img2img strength used by the emoji stage when a caller gives none.
    #[serde(default = "default_strength")]
    pub strength: f64,
}

fn default_strength() -> f64 {
    0.6
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetFile {
    name: String,
    description: String,
    architecture: Architecture,
    #[serde(default)]
    repo: Option<String>,
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    local_dir: Option<String>,
    scheduler: SchedulerKind,
    /// `trailing` for few-step turbo models even when the repo's config says otherwise.
    #[serde(default)]
    timestep_spacing: Option<String>,
    /// Run the VAE in f32 even when the rest runs in f16 (SDXL's VAE overflows in f16).
    #[serde(default)]
    vae_f32: bool,
    weights: WeightFiles,
    defaults: PresetDefaults,
}

/// A validated preset.
#[derive(Debug, Clone)]
pub struct ModelPreset {
    pub name: String,
    pub description: String,
    pub architecture: Architecture,
    pub source: ModelSource,
    pub scheduler: SchedulerKind,
    pub timestep_spacing: Option<String>,
    pub vae_f32: bool,
    pub weights: WeightFiles,
    pub defaults: PresetDefaults,
}

impl ModelPreset {
    /// Parses and validates one preset file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, EngineError> {
        let bad = |message: String| EngineError::Preset {
            origin: origin.to_string(),
            message,
        };
        let file: PresetFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let source = match (file.repo, file.revision, file.local_dir) {
            (Some(repo), Some(revision), None) => ModelSource::Hub { repo, revision },
            (None, None, Some(dir)) => ModelSource::Local { dir },
            _ => {
                return Err(bad(
                    "give either `repo` + `revision` (a Hugging Face model) or `local_dir`".into(),
                ));
            }
        };
        if (file.architecture == Architecture::Sdxl) != file.weights.text_encoder_2.is_some() {
            return Err(bad(
                "`weights.text_encoder_2` is required for sdxl and only for sdxl".into(),
            ));
        }
        let d = &file.defaults;
        if d.steps == 0 || d.width == 0 || d.height == 0 || d.width % 8 != 0 || d.height % 8 != 0 {
            return Err(bad(
                "defaults need steps > 0 and a width and height that are multiples of 8".into(),
            ));
        }
        if !(d.strength > 0.0 && d.strength <= 1.0) {
            return Err(bad("defaults.strength must be in (0, 1]".into()));
        }
        if let Some(s) = &file.timestep_spacing
            && !matches!(s.as_str(), "leading" | "trailing" | "linspace")
        {
            return Err(bad(format!(
                "timestep_spacing `{s}` (expected leading, trailing or linspace)"
            )));
        }
        Ok(Self {
            name: file.name,
            description: file.description,
            architecture: file.architecture,
            source,
            scheduler: file.scheduler,
            timestep_spacing: file.timestep_spacing,
            vae_f32: file.vae_f32,
            weights: file.weights,
            defaults: file.defaults,
        })
    }

    /// Every file the engine reads, relative to the model root: configs, tokenizers, weights.
    pub fn files(&self) -> Vec<String> {
        let mut files = vec!["scheduler/scheduler_config.json".to_string()];
        let mut encoder = |tok: &str, enc: &str, weights: &str| {
            for f in [
                "vocab.json",
                "merges.txt",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ] {
                files.push(format!("{tok}/{f}"));
            }
            files.push(format!("{enc}/config.json"));
            files.push(weights.to_string());
        };
        encoder("tokenizer", "text_encoder", &self.weights.text_encoder);
        if let Some(w2) = &self.weights.text_encoder_2 {
            encoder("tokenizer_2", "text_encoder_2", w2);
        }
        files.push("unet/config.json".into());
        files.push(self.weights.unet.clone());
        files.push("vae/config.json".into());
        files.push(self.weights.vae.clone());
        files
    }
}

/// The known presets: the embedded ones, overridden or extended by `*.toml` in a models folder.
#[derive(Debug, Clone)]
pub struct PresetRegistry {
    presets: BTreeMap<String, ModelPreset>,
    models_dir: PathBuf,
}

impl PresetRegistry {
    /// Loads the embedded presets, then every `*.toml` in `models_dir` (if the folder exists).
    pub fn load(models_dir: &Path) -> Result<Self, EngineError> {
        let mut presets = BTreeMap::new();
        for (name, text) in EMBEDDED {
            let preset = ModelPreset::parse(text, &format!("embedded preset {name}"))?;
            presets.insert(preset.name.clone(), preset);
        }
        if let Ok(entries) = std::fs::read_dir(models_dir) {
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            paths.sort();
            for path in paths {
                let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
                    path: path.clone(),
                    source,
                })?;
                let preset = ModelPreset::parse(&text, &path.display().to_string())?;
                presets.insert(preset.name.clone(), preset);
            }
        }
        Ok(Self {
            presets,
            models_dir: models_dir.to_path_buf(),
        })
    }

    /// The default models folder: `$POPCON_MODELS_DIR`, else `./models` when it exists, else the
    /// source tree's `models/` (so `cargo run` and tests find the tiny model from anywhere).
    pub fn default_models_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("POPCON_MODELS_DIR") {
            return PathBuf::from(dir);
        }
        let local = PathBuf::from("models");
        if local.join("tiny.toml").exists() {
            return local;
        }
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models"))
    }

    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    pub fn get(&self, name: &str) -> Result<&ModelPreset, EngineError> {
        self.presets
            .get(name)
            .ok_or_else(|| EngineError::UnknownModel {
                name: name.to_string(),
                known: self.names().join(", "),
            })
    }

    pub fn names(&self) -> Vec<String> {
        self.presets.keys().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModelPreset> {
        self.presets.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_presets_parse_and_name_their_files() {
        let reg = PresetRegistry::load(Path::new("/nonexistent")).unwrap();
        assert_eq!(
            reg.names(),
            ["sd-turbo", "sd15", "sdxl-turbo", "tiny", "tiny-sd15"]
        );
        let turbo = reg.get("sd-turbo").unwrap();
        assert_eq!(turbo.architecture, Architecture::Sd2);
        assert_eq!(turbo.scheduler, SchedulerKind::EulerAncestral);
        assert!(
            matches!(&turbo.source, ModelSource::Hub { repo, .. } if repo == "stabilityai/sd-turbo")
        );
        assert!(turbo.files().contains(&"tokenizer/merges.txt".to_string()));
        let xl = reg.get("sdxl-turbo").unwrap();
        assert!(xl.files().iter().any(|f| f.starts_with("text_encoder_2/")));
        assert!(matches!(
            reg.get("tiny").unwrap().source,
            ModelSource::Local { .. }
        ));
    }

    #[test]
    fn unknown_model_lists_the_known_ones() {
        let reg = PresetRegistry::load(Path::new("/nonexistent")).unwrap();
        let err = reg.get("sd99").unwrap_err().to_string();
        assert!(
            err.contains("sd99") && err.contains("sd-turbo") && err.contains("tiny"),
            "{err}"
        );
    }

    #[test]
    fn invalid_presets_are_rejected_with_the_reason() {
        let base = r#"
name = "x"
description = "d"
architecture = "sd2"
repo = "a/b"
revision = "main"
scheduler = "euler"
[weights]
text_encoder = "t"
unet = "u"
vae = "v"
[defaults]
steps = 4
guidance = 1.0
width = 512
height = 512
"#;
        assert!(ModelPreset::parse(base, "t").is_ok());
        let no_source = base.replace("repo = \"a/b\"\n", "");
        assert!(
            ModelPreset::parse(&no_source, "t")
                .unwrap_err()
                .to_string()
                .contains("repo")
        );
        let odd = base.replace("width = 512", "width = 500");
        assert!(
            ModelPreset::parse(&odd, "t")
                .unwrap_err()
                .to_string()
                .contains("multiples of 8")
        );
        let xl = base.replace("\"sd2\"", "\"sdxl\"");
        assert!(
            ModelPreset::parse(&xl, "t")
                .unwrap_err()
                .to_string()
                .contains("text_encoder_2")
        );
        let typo = base.replace("scheduler = \"euler\"", "scheduler = \"eular\"");
        assert!(ModelPreset::parse(&typo, "t").is_err());
    }
}
