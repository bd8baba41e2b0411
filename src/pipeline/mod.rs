//! What the product asks of the engine, with no Redis and no SQL: the prompts (the head-to-toe
//! pose prompt, the emoji sticker prompts) and the post-processing of generated images
//! (background key clean-up, thumbnails, PNG). The daemon composes these with the engine.

pub mod post;
pub mod prompt;
