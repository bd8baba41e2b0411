//! Animated stickers from a clip's frames: the loop seam blended so the animation does not jump
//! when it wraps, then animated WebP (what sticker platforms take) and APNG (what browsers and
//! apps without animated WebP show). Both are lossless and keep the alpha channel the key made
//! (WebP drops the colour under fully transparent pixels, which nothing shows).
//!
//! No I/O and no engine: the frames come from the animation pipeline, the bytes go to the blob
//! store.

use std::io::Cursor;

use image::RgbaImage;

/// The frame rates a sticker may have.
pub const FPS_RANGE: std::ops::RangeInclusive<u32> = 1..=60;

/// Why a clip cannot be made or written.
#[derive(Debug, thiserror::Error)]
pub enum AnimationError {
    #[error("a clip needs at least one frame")]
    Empty,
    #[error("frame {index} is {got:?}, frame 0 is {want:?}: every frame must have one size")]
    SizeMismatch {
        index: usize,
        got: (u32, u32),
        want: (u32, u32),
    },
    #[error("a frame of {0:?} has no pixels")]
    ZeroSize((u32, u32)),
    #[error("{0} fps is outside 1-60")]
    Fps(u32),
    #[error("the loop blend of {overlap} frames needs a clip of at least {need} frames, got {got}")]
    Overlap {
        overlap: usize,
        need: usize,
        got: usize,
    },
    #[error("encoding the {format}: {detail}")]
    Encode {
        format: &'static str,
        detail: String,
    },
}

/// Frames of one size at a frame rate.
#[derive(Debug, Clone)]
pub struct Clip {
    frames: Vec<RgbaImage>,
    fps: u32,
}

impl Clip {
    /// Checks that there are frames, all of one non-empty size, at a rate in [`FPS_RANGE`].
    pub fn new(frames: Vec<RgbaImage>, fps: u32) -> Result<Clip, AnimationError> {
        let first = frames.first().ok_or(AnimationError::Empty)?;
        let want = first.dimensions();
        if want.0 == 0 || want.1 == 0 {
            return Err(AnimationError::ZeroSize(want));
        }
        if let Some((index, f)) = frames
            .iter()
            .enumerate()
            .find(|(_, f)| f.dimensions() != want)
        {
            return Err(AnimationError::SizeMismatch {
                index,
                got: f.dimensions(),
                want,
            });
        }
        if !FPS_RANGE.contains(&fps) {
            return Err(AnimationError::Fps(fps));
        }
        Ok(Clip { frames, fps })
    }

    pub fn frames(&self) -> &[RgbaImage] {
        &self.frames
    }

    pub fn fps(&self) -> u32 {
        self.fps
    }

    /// When frame `i` starts, in milliseconds (rounded, so a 3 fps clip does not drift).
    fn timestamp_ms(&self, i: usize) -> i32 {
        ((i as u64 * 1000 + u64::from(self.fps) / 2) / u64::from(self.fps)) as i32
    }

    /// Crossfades the last `overlap` frames toward the first ones, so the clip wraps without
    /// a jump: frame n−overlap+k becomes a mix of itself and frame k, frame k's weight growing
    /// from 1/(overlap+1) to overlap/(overlap+1). Alpha is mixed too.
    pub fn blend_loop(&mut self, overlap: usize) -> Result<(), AnimationError> {
        let n = self.frames.len();
        if overlap == 0 {
            return Ok(());
        }
        // The blended tail must not reach into the frames it blends toward.
        if n < 2 * overlap {
            return Err(AnimationError::Overlap {
                overlap,
                need: 2 * overlap,
                got: n,
            });
        }
        for k in 0..overlap {
            let w = (k + 1) as f32 / (overlap + 1) as f32;
            let (head, tail) = self.frames.split_at_mut(n - overlap);
            let toward = &head[k];
            let frame = &mut tail[k];
            for (p, q) in frame.pixels_mut().zip(toward.pixels()) {
                for c in 0..4 {
                    let v = f32::from(p.0[c]) * (1.0 - w) + f32::from(q.0[c]) * w;
                    p.0[c] = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        Ok(())
    }

    /// An animated WebP, lossless, looping forever.
    pub fn to_webp(&self) -> Result<Vec<u8>, AnimationError> {
        let err = |e: webp_animation::Error| AnimationError::Encode {
            format: "animated WebP",
            detail: format!("{e:?}"),
        };
        let mut enc = webp_animation::Encoder::new(self.frames[0].dimensions()).map_err(err)?;
        for (i, f) in self.frames.iter().enumerate() {
            enc.add_frame(f.as_raw(), self.timestamp_ms(i))
                .map_err(err)?;
        }
        let data = enc
            .finalize(self.timestamp_ms(self.frames.len()))
            .map_err(err)?;
        Ok(data.to_vec())
    }

    /// An APNG, looping forever, every frame a full RGBA image of the clip's size.
    pub fn to_apng(&self) -> Result<Vec<u8>, AnimationError> {
        let err = |e: png::EncodingError| AnimationError::Encode {
            format: "APNG",
            detail: e.to_string(),
        };
        let (w, h) = self.frames[0].dimensions();
        let mut out = Cursor::new(Vec::new());
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgba);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_animated(self.frames.len() as u32, 0).map_err(err)?;
            // `fps` ≤ 60 fits the delay's u16 fields.
            enc.set_frame_delay(1, self.fps as u16).map_err(err)?;
            let mut writer = enc.write_header().map_err(err)?;
            for f in &self.frames {
                writer.write_image_data(f.as_raw()).map_err(err)?;
            }
            writer.finish().map_err(err)?;
        }
        Ok(out.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{AnimationDecoder, Rgba};

    /// `n` frames of `w`×`h`, each a distinct gradient with a transparent corner.
    fn frames(n: usize, w: u32, h: u32) -> Vec<RgbaImage> {
        (0..n)
            .map(|i| {
                RgbaImage::from_fn(w, h, |x, y| {
                    let a = if x < 2 && y < 2 { 0 } else { 255 };
                    Rgba([
                        (x * 20 + i as u32 * 30) as u8,
                        (y * 20) as u8,
                        (i * 40) as u8,
                        a,
                    ])
                })
            })
            .collect()
    }

    fn decoded(frames: image::Frames<'_>) -> Vec<(RgbaImage, u32)> {
        frames
            .collect_frames()
            .unwrap()
            .into_iter()
            .map(|f| {
                let (num, den) = f.delay().numer_denom_ms();
                (f.into_buffer(), num / den)
            })
            .collect()
    }

    #[test]
    fn webp_and_apng_hold_every_frame_exactly_with_its_timing() {
        let clip = Clip::new(frames(8, 12, 10), 8).unwrap();
        let webp = clip.to_webp().unwrap();
        let apng = clip.to_apng().unwrap();
        let from_webp = decoded(
            image::codecs::webp::WebPDecoder::new(Cursor::new(&webp))
                .unwrap()
                .into_frames(),
        );
        let from_apng = decoded(
            image::codecs::png::PngDecoder::new(Cursor::new(&apng))
                .unwrap()
                .apng()
                .unwrap()
                .into_frames(),
        );
        // libwebp drops the colour of fully transparent pixels (nothing shows it); every
        // visible pixel and every alpha value must survive exactly.
        let visible = |img: &RgbaImage| -> Vec<[u8; 4]> {
            img.pixels()
                .map(|p| if p.0[3] == 0 { [0, 0, 0, 0] } else { p.0 })
                .collect()
        };
        for (name, got) in [("webp", from_webp), ("apng", from_apng)] {
            assert_eq!(got.len(), 8, "{name}");
            for (i, (img, delay)) in got.iter().enumerate() {
                assert_eq!(
                    visible(img),
                    visible(&clip.frames()[i]),
                    "{name} frame {i} (lossless, alpha kept)"
                );
                assert_eq!(*delay, 125, "{name} frame {i} delay at 8 fps");
            }
        }
    }

    #[test]
    fn the_loop_blend_moves_the_tail_toward_the_head_and_leaves_the_rest() {
        let original = frames(8, 4, 4);
        let mut clip = Clip::new(original.clone(), 8).unwrap();
        clip.blend_loop(2).unwrap();
        let f = clip.frames();
        assert_eq!(&f[..6], &original[..6], "the head and middle are untouched");
        // Frame 6 is 1/3 of the way to frame 0, frame 7 2/3 of the way to frame 1.
        let px = |img: &RgbaImage| img.get_pixel(3, 3).0[0] as f32;
        let expect6 = px(&original[6]) * 2.0 / 3.0 + px(&original[0]) / 3.0;
        let expect7 = px(&original[7]) / 3.0 + px(&original[1]) * 2.0 / 3.0;
        assert!(
            (px(&f[6]) - expect6).abs() <= 0.5,
            "{} vs {expect6}",
            px(&f[6])
        );
        assert!(
            (px(&f[7]) - expect7).abs() <= 0.5,
            "{} vs {expect7}",
            px(&f[7])
        );
        // The last frame is now closer to the first than it was: the wrap jumps less.
        let dist = |a: &RgbaImage, b: &RgbaImage| -> u64 {
            a.as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(x, y)| u64::from(x.abs_diff(*y)))
                .sum()
        };
        assert!(dist(&f[7], &f[0]) < dist(&original[7], &original[0]));
        let mut same = Clip::new(original.clone(), 8).unwrap();
        same.blend_loop(0).unwrap();
        assert_eq!(same.frames(), &original[..]);
    }

    #[test]
    fn bad_clips_are_refused_with_one_message() {
        assert!(matches!(Clip::new(vec![], 8), Err(AnimationError::Empty)));
        let mut mixed = frames(3, 4, 4);
        mixed.push(RgbaImage::new(5, 4));
        assert!(matches!(
            Clip::new(mixed, 8),
            Err(AnimationError::SizeMismatch { index: 3, .. })
        ));
        assert!(matches!(
            Clip::new(frames(2, 4, 4), 0),
            Err(AnimationError::Fps(0))
        ));
        assert!(matches!(
            Clip::new(frames(2, 4, 4), 61),
            Err(AnimationError::Fps(61))
        ));
        assert!(matches!(
            Clip::new(vec![RgbaImage::new(0, 4)], 8),
            Err(AnimationError::ZeroSize(_))
        ));
        let mut short = Clip::new(frames(3, 4, 4), 8).unwrap();
        let e = short.blend_loop(2).unwrap_err();
        assert!(e.to_string().contains("at least 4 frames"), "{e}");
    }
}
