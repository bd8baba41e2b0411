//! Prompt builders for the pose image and the emoji set.
//!
//! The wording is product behaviour, pinned by tests: the system this replaces lost weeks to
//! "full body" prompts that cropped feet or drew shoes (seed log, commit cad14bc). Diffusion
//! models read "head-to-toe" as a framing instruction, and "feet visible (not shoes)" stops the
//! shoe default. Change the constants only together with their tests.

/// The pose framing, appended verbatim after the subject. Never "full body".
pub const POSE_FRAMING: &str = "head-to-toe shot of the subject, feet visible (not shoes)";

/// The sticker look every emoji shares.
pub const EMOJI_LOOK: &str = "sticker, bold outline, plain white background";

/// What emoji images must not contain; the plain background is what the alpha key removes.
pub const EMOJI_NEGATIVE: &str = "photo, realistic, text, letters, watermark, signature, \
busy background, gradient background, shadow, cropped, blurry, multiple characters";

/// The default set of eight expressions of a generate-set.
pub const DEFAULT_EXPRESSIONS: [&str; 8] = [
    "happy",
    "sad",
    "angry",
    "surprised",
    "laughing",
    "crying",
    "in love",
    "thinking",
];

/// The style when a job names none.
pub const DEFAULT_STYLE: &str = "cartoon";

const MAX_TEXT: usize = 200;

/// A rejected prompt input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} characters; at most {MAX_TEXT} are allowed")]
    TooLong { field: &'static str, len: usize },
    #[error("{field} contains a control character")]
    Control { field: &'static str },
}

/// Trims `text` and checks it is usable inside a prompt.
fn clean<'a>(field: &'static str, text: &'a str) -> Result<&'a str, PromptError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(PromptError::Empty { field });
    }
    let len = t.chars().count();
    if len > MAX_TEXT {
        return Err(PromptError::TooLong { field, len });
    }
    if t.chars().any(char::is_control) {
        return Err(PromptError::Control { field });
    }
    Ok(t)
}

/// The pose prompt: the subject followed by exactly [`POSE_FRAMING`].
pub fn pose_prompt(subject: &str) -> Result<String, PromptError> {
    let subject = clean("subject", subject)?;
    Ok(format!("{subject}, {POSE_FRAMING}"))
}

/// One emoji's prompt pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmojiPrompt {
    pub prompt: String,
    pub negative: String,
}

/// Subject + expression + style, in the sticker look, with the shared negative prompt.
pub fn emoji_prompt(
    subject: &str,
    expression: &str,
    style: &str,
) -> Result<EmojiPrompt, PromptError> {
    let subject = clean("subject", subject)?;
    let expression = clean("expression", expression)?;
    let style = if style.trim().is_empty() {
        DEFAULT_STYLE
    } else {
        clean("style", style)?
    };
    Ok(EmojiPrompt {
        prompt: format!("{subject}, {expression} expression, {style} style, {EMOJI_LOOK}"),
        negative: EMOJI_NEGATIVE.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pose_prompt_wording_is_pinned() {
        assert_eq!(
            pose_prompt("a red fox").unwrap(),
            "a red fox, head-to-toe shot of the subject, feet visible (not shoes)"
        );
        assert_eq!(
            POSE_FRAMING,
            "head-to-toe shot of the subject, feet visible (not shoes)"
        );
    }

    #[test]
    fn pose_prompt_never_says_full_body() {
        for subject in ["a knight", "  my grandmother in a garden ", "Robot #7"] {
            let p = pose_prompt(subject).unwrap().to_lowercase();
            assert!(!p.contains("full body") && !p.contains("full-body"), "{p}");
            assert!(p.ends_with(POSE_FRAMING), "{p}");
        }
    }

    #[test]
    fn emoji_prompt_has_subject_expression_style_and_the_sticker_look() {
        let e = emoji_prompt("a red fox", "laughing", "pixel art").unwrap();
        assert_eq!(
            e.prompt,
            "a red fox, laughing expression, pixel art style, sticker, bold outline, plain white background"
        );
        assert_eq!(e.negative, EMOJI_NEGATIVE);
        assert!(e.negative.contains("realistic") && e.negative.contains("text"));
        let d = emoji_prompt("a red fox", "sad", " ").unwrap();
        assert!(d.prompt.contains("cartoon style"));
    }

    #[test]
    fn bad_prompt_inputs_are_rejected_precisely() {
        assert_eq!(
            pose_prompt("  "),
            Err(PromptError::Empty { field: "subject" })
        );
        assert_eq!(
            emoji_prompt("fox", "", "x"),
            Err(PromptError::Empty {
                field: "expression"
            })
        );
        let long = "a".repeat(201);
        assert_eq!(
            pose_prompt(&long),
            Err(PromptError::TooLong {
                field: "subject",
                len: 201
            })
        );
        assert_eq!(
            pose_prompt("fox\u{0007}"),
            Err(PromptError::Control { field: "subject" })
        );
    }

    #[test]
    fn default_set_has_eight_distinct_expressions() {
        let mut v = DEFAULT_EXPRESSIONS.to_vec();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), 8);
    }
}
