//! Animation presets: which SD 1.5 base and which motion adapter an animation runs, and how.
//!
//! A preset is a TOML file in `models/animations/` (the shipped ones are also compiled in,
//! like the model presets). It names its base by model preset (`base = "sd15"`), pins the
//! adapter's source (a Hub repo at a revision, or a local folder for the tiny test adapter),
//! the adapter's files, the scheduler the adapter was trained or distilled for, and the clip
//! defaults: frames, frame rate, steps, guidance, strength, size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::EngineError;
use super::config::BetaSchedule;
use super::motion::MotionSpec;
use super::preset::{ModelSource, SchedulerKind};
use super::weights::{ModelFiles, Pinned};

const EMBEDDED: &[(&str, &str)] = &[
    (
        "lightning",
        include_str!("../../models/animations/lightning.toml"),
    ),
    (
        "animatediff-v3",
        include_str!("../../models/animations/animatediff-v3.toml"),
    ),
    (
        "tiny-motion",
        include_str!("../../models/animations/tiny-motion.toml"),
    ),
];

/// The adapter's files and where they come from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct AdapterFile {
    #[serde(default)]
    repo: Option<String>,
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    local_dir: Option<String>,
    weights: String,
    /// A diffusers `MotionAdapter` config; absent: `MotionAdapter()`'s defaults (AnimateDiff-
    /// Lightning ships its weights without one).
    #[serde(default)]
    config: Option<String>,
}

/// Clip defaults a request falls back to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnimationDefaults {
    pub frames: usize,
    pub fps: u32,
    pub steps: usize,
    pub guidance: f64,
    pub strength: f64,
    pub width: usize,
    pub height: usize,
    /// Frames blended across the loop seam (see `pipeline::animation::blend_loop`).
    #[serde(default = "default_blend")]
    pub loop_blend: usize,
}

fn default_blend() -> usize {
    2
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnimationFile {
    name: String,
    description: String,
    base: String,
    scheduler: SchedulerKind,
    #[serde(default)]
    timestep_spacing: Option<String>,
    #[serde(default)]
    beta_schedule: Option<String>,
    /// DDIM: clamp the predicted clean sample (the SD 1.5 configs leave it to DDIM's default,
    /// on, which AnimateDiff runs off).
    #[serde(default)]
    clip_sample: Option<bool>,
    adapter: AdapterFile,
    defaults: AnimationDefaults,
}

/// A validated animation preset.
#[derive(Debug, Clone)]
pub struct AnimationPreset {
    pub name: String,
    pub description: String,
    /// The model preset whose weights are the base (an SD 1.5 architecture).
    pub base: String,
    pub scheduler: SchedulerKind,
    pub timestep_spacing: Option<String>,
    pub beta_schedule: Option<BetaSchedule>,
    pub clip_sample: Option<bool>,
    pub source: ModelSource,
    pub weights: String,
    pub config: Option<String>,
    pub defaults: AnimationDefaults,
}

impl Pinned for AnimationPreset {
    fn name(&self) -> &str {
        &self.name
    }
    fn source(&self) -> &ModelSource {
        &self.source
    }
    fn files(&self) -> Vec<String> {
        let mut files = vec![self.weights.clone()];
        files.extend(self.config.clone());
        files
    }
}

impl AnimationPreset {
    pub fn parse(text: &str, origin: &str) -> Result<Self, EngineError> {
        let bad = |message: String| EngineError::Preset {
            origin: origin.to_string(),
            message,
        };
        let file: AnimationFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let a = file.adapter;
        let source = match (a.repo, a.revision, a.local_dir) {
            (Some(repo), Some(revision), None) => ModelSource::Hub { repo, revision },
            (None, None, Some(dir)) => ModelSource::Local { dir },
            _ => {
                return Err(bad(
                    "give the adapter either `repo` + `revision` or `local_dir`".into(),
                ));
            }
        };
        let d = &file.defaults;
        if d.frames < 2 || d.fps == 0 || d.steps == 0 {
            return Err(bad(
                "defaults need at least 2 frames, fps > 0 and steps > 0".into(),
            ));
        }
        if d.width == 0 || d.height == 0 || d.width % 8 != 0 || d.height % 8 != 0 {
            return Err(bad(
                "defaults.width and height must be multiples of 8".into()
            ));
        }
        if !(d.strength > 0.0 && d.strength <= 1.0) {
            return Err(bad("defaults.strength must be in (0, 1]".into()));
        }
        if !d.guidance.is_finite() || d.guidance < 0.0 {
            return Err(bad("defaults.guidance must be >= 0".into()));
        }
        if let Some(s) = &file.timestep_spacing
            && !matches!(s.as_str(), "leading" | "trailing" | "linspace")
        {
            return Err(bad(format!(
                "timestep_spacing `{s}` (expected leading, trailing or linspace)"
            )));
        }
        let beta_schedule = match file.beta_schedule.as_deref() {
            None => None,
            Some("linear") => Some(BetaSchedule::Linear),
            Some("scaled_linear") => Some(BetaSchedule::ScaledLinear),
            Some("squaredcos_cap_v2") => Some(BetaSchedule::SquaredCosCapV2),
            Some(other) => {
                return Err(bad(format!(
                    "beta_schedule `{other}` (expected linear, scaled_linear or squaredcos_cap_v2)"
                )));
            }
        };
        Ok(Self {
            name: file.name,
            description: file.description,
            base: file.base,
            scheduler: file.scheduler,
            timestep_spacing: file.timestep_spacing,
            beta_schedule,
            clip_sample: file.clip_sample,
            source,
            weights: a.weights,
            config: a.config,
            defaults: file.defaults,
        })
    }

    /// The adapter's shape: its config file when the preset names one, else diffusers'
    /// `MotionAdapter()` defaults.
    pub fn motion_spec(&self, files: &ModelFiles) -> Result<MotionSpec, EngineError> {
        match &self.config {
            Some(c) => MotionSpec::read(files.path(c)?),
            None => Ok(MotionSpec::sd15()),
        }
    }
}

/// The known animation presets: embedded, overridden or extended by `animations/*.toml` in
/// the models folder.
#[derive(Debug, Clone)]
pub struct AnimationRegistry {
    presets: BTreeMap<String, AnimationPreset>,
}

impl AnimationRegistry {
    pub fn load(models_dir: &Path) -> Result<Self, EngineError> {
        let mut presets = BTreeMap::new();
        for (name, text) in EMBEDDED {
            let p = AnimationPreset::parse(text, &format!("embedded animation preset {name}"))?;
            presets.insert(p.name.clone(), p);
        }
        let dir = models_dir.join("animations");
        if let Ok(entries) = std::fs::read_dir(&dir) {
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
                let p = AnimationPreset::parse(&text, &path.display().to_string())?;
                presets.insert(p.name.clone(), p);
            }
        }
        Ok(Self { presets })
    }

    pub fn get(&self, name: &str) -> Result<&AnimationPreset, EngineError> {
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

    pub fn iter(&self) -> impl Iterator<Item = &AnimationPreset> {
        self.presets.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_presets_parse_and_name_their_bases() {
        let reg = AnimationRegistry::load(Path::new("/nonexistent")).unwrap();
        assert_eq!(reg.names(), ["animatediff-v3", "lightning", "tiny-motion"]);
        let l = reg.get("lightning").unwrap();
        assert_eq!(l.base, "sd15");
        assert_eq!(l.scheduler, SchedulerKind::Euler);
        assert_eq!(l.beta_schedule, Some(BetaSchedule::Linear));
        assert_eq!(l.timestep_spacing.as_deref(), Some("trailing"));
        assert_eq!((l.defaults.steps, l.defaults.guidance), (4, 1.0));
        assert!(l.config.is_none(), "Lightning ships no adapter config");
        assert!(matches!(
            reg.get("tiny-motion").unwrap().source,
            ModelSource::Local { .. }
        ));
    }

    #[test]
    fn bad_presets_say_what_is_wrong() {
        let ok = include_str!("../../models/animations/tiny-motion.toml");
        let cases = [
            (ok.replace("frames = 8", "frames = 1"), "at least 2 frames"),
            (ok.replace("width = 64", "width = 60"), "multiples of 8"),
            (
                ok.replace("beta_schedule = \"linear\"", "beta_schedule = \"cosine\""),
                "beta_schedule `cosine`",
            ),
            (ok.replace("local_dir", "locl_dir"), "unknown field"),
        ];
        for (text, want) in cases {
            let err = AnimationPreset::parse(&text, "test")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
        let missing = AnimationRegistry::load(Path::new("/nonexistent"))
            .unwrap()
            .get("nope")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("lightning"), "{missing}");
    }
}
