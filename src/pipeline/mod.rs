//! What the product asks of the engine, with no Redis and no SQL: the prompts (the head-to-toe
//! pose prompt, the emoji sticker prompts), the set pipeline's requests and seeds ([`set`]),
//! approve's animation requests and sticker files ([`sticker`]), and the post-processing of
//! generated images (background key clean-up, thumbnails, PNG; animated WebP and APNG for
//! clips, [`animation`]). The worker runs these on the engine and does the I/O.

pub mod animation;
pub mod post;
pub mod prompt;
pub mod set;
pub mod sticker;
