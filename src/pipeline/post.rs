//! Post-processing of generated images, and decoding of uploaded ones. Pure functions.
//!
//! The per-pixel work (VAE output → RGBA8 with the near-white background keyed to
//! transparency) is the fused kernel in [`crate::kernels`]; what needs the whole image lives
//! here: a per-pixel key also clears white *inside* the subject (eyes, teeth, highlights), so
//! [`restore_enclosed`] gives opacity back to keyed pixels the background doesn't reach.

use std::collections::VecDeque;
use std::io::Cursor;

use image::{ImageFormat, RgbImage, RgbaImage};

/// Side of the square a thumbnail fits in.
pub const THUMBNAIL_SIZE: u32 = 128;

/// What uploads may be: enough for any reference photo, too little for a decompression bomb.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_bytes: usize,
    pub max_side: u32,
    pub max_pixels: u64,
}

impl ImageLimits {
    /// The decoder's allocation budget: an 8-bit RGBA image of `max_pixels` (4 bytes a
    /// pixel) fits; a 16-bit one of that size (6 or 8 bytes a pixel) does not, however small
    /// the file.
    pub fn max_alloc(&self) -> u64 {
        self.max_pixels.saturating_mul(4)
    }
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            max_side: 8192,
            max_pixels: 24_000_000,
        }
    }
}

/// Why an image was rejected or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image is {size} bytes; at most {max} are accepted")]
    TooManyBytes { size: usize, max: usize },
    #[error("not an image in a supported format (PNG, JPEG or WebP)")]
    UnknownFormat,
    #[error("image is {width}x{height}; at most {max_side} px a side and {max_pixels} px in all")]
    TooLarge {
        width: u32,
        height: u32,
        max_side: u32,
        max_pixels: u64,
    },
    #[error(
        "image is {width}x{height} and would need more than {max_alloc} bytes to decode ({detail})"
    )]
    OverBudget {
        width: u32,
        height: u32,
        max_alloc: u64,
        detail: String,
    },
    #[error("image could not be decoded: {0}")]
    Decode(String),
    #[error("PNG encoding failed: {0}")]
    Encode(String),
}

/// Decodes an uploaded PNG/JPEG/WebP to RGB, checking size and dimensions *before* decoding
/// pixels, so a bad upload fails fast and never reaches the GPU.
pub fn decode_image(bytes: &[u8], limits: ImageLimits) -> Result<RgbImage, ImageError> {
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            size: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::UnknownFormat)?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
    ) {
        return Err(ImageError::UnknownFormat);
    }
    // Header only: the dimensions are known before a single pixel is allocated.
    let (width, height) = image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    if width == 0
        || height == 0
        || width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels
    {
        return Err(ImageError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        });
    }
    // The decoder's own budget: a 16-bit RGBA image takes 8 bytes a pixel while decoding, so
    // the header checks above (pixels, sides) do not bound memory; `max_alloc` does, for every
    // buffer the decoder asks for, and refuses before allocating.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder_limits.max_alloc = Some(limits.max_alloc());
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decoder_limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => ImageError::OverBudget {
            width,
            height,
            max_alloc: limits.max_alloc(),
            detail: l.to_string(),
        },
        e => ImageError::Decode(e.to_string()),
    })?;
    Ok(img.to_rgb8())
}

/// Makes keyed (alpha < 255) pixels that are not connected to the image border through other
/// keyed pixels opaque again: the background touches the border, a white eye does not.
pub fn restore_enclosed(img: &mut RgbaImage) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return;
    }
    let keyed = |img: &RgbaImage, x: usize, y: usize| img.get_pixel(x as u32, y as u32)[3] < 255;
    let mut reached = vec![false; w * h];
    let mut queue = VecDeque::new();
    for x in 0..w {
        for y in [0, h - 1] {
            if keyed(img, x, y) && !reached[y * w + x] {
                reached[y * w + x] = true;
                queue.push_back((x, y));
            }
        }
    }
    for y in 0..h {
        for x in [0, w - 1] {
            if keyed(img, x, y) && !reached[y * w + x] {
                reached[y * w + x] = true;
                queue.push_back((x, y));
            }
        }
    }
    while let Some((x, y)) = queue.pop_front() {
        let mut visit = |nx: usize, ny: usize| {
            if !reached[ny * w + nx] && keyed(img, nx, ny) {
                reached[ny * w + nx] = true;
                queue.push_back((nx, ny));
            }
        };
        if x > 0 {
            visit(x - 1, y);
        }
        if x + 1 < w {
            visit(x + 1, y);
        }
        if y > 0 {
            visit(x, y - 1);
        }
        if y + 1 < h {
            visit(x, y + 1);
        }
    }
    for (i, px) in img.pixels_mut().enumerate() {
        if px[3] < 255 && !reached[i] {
            px[3] = 255;
        }
    }
}

/// Scales `img` to fit in `max`×`max`, keeping its aspect ratio; never enlarges.
pub fn thumbnail(img: &RgbaImage, max: u32) -> RgbaImage {
    let (w, h) = img.dimensions();
    if w <= max && h <= max {
        return img.clone();
    }
    let scale = f64::from(max) / f64::from(w.max(h));
    let tw = ((f64::from(w) * scale).round() as u32).clamp(1, max);
    let th = ((f64::from(h) * scale).round() as u32).clamp(1, max);
    image::imageops::resize(img, tw, th, image::imageops::FilterType::Lanczos3)
}

/// PNG bytes of an RGBA image.
pub fn encode_png(img: &RgbaImage) -> Result<Vec<u8>, ImageError> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)
        .map_err(|e| ImageError::Encode(e.to_string()))?;
    Ok(out.into_inner())
}

/// PNG bytes of an RGB image (an uploaded reference, stored as decoded).
pub fn encode_rgb_png(img: &RgbImage) -> Result<Vec<u8>, ImageError> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)
        .map_err(|e| ImageError::Encode(e.to_string()))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgba;

    /// A `side`² all-zero 16-bit RGB PNG: it deflates to almost nothing.
    pub(crate) fn zero_png16(side: u32) -> Vec<u8> {
        let img = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::new(side, side);
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .expect("encode");
        out
    }

    #[test]
    fn a_small_16_bit_png_cannot_make_the_decoder_allocate_hundreds_of_mb() {
        let png = zero_png16(4896);
        let limits = ImageLimits::default();
        // The premise: small file, dimensions inside the header checks.
        assert!(png.len() < 1024 * 1024, "{} bytes", png.len());
        assert!(4896u64 * 4896 <= limits.max_pixels);
        match decode_image(&png, limits) {
            Err(ImageError::OverBudget {
                width: 4896,
                height: 4896,
                max_alloc,
                ..
            }) => assert_eq!(max_alloc, limits.max_alloc()),
            other => panic!(
                "expected OverBudget, got {:?}",
                other.map(|i| i.dimensions())
            ),
        }
        // The same image in 8 bits is within budget and decodes.
        let small = zero_png16(64);
        assert_eq!(
            decode_image(&small, limits).expect("decodes").dimensions(),
            (64, 64)
        );
    }

    /// A white 9×9 canvas (keyed: alpha 0) with an opaque 5×5 dark ring around a white hole.
    fn ringed() -> RgbaImage {
        let mut img = RgbaImage::from_pixel(9, 9, Rgba([255, 255, 255, 0]));
        for y in 2..7 {
            for x in 2..7 {
                img.put_pixel(x, y, Rgba([20, 20, 20, 255]));
            }
        }
        img.put_pixel(4, 4, Rgba([255, 255, 255, 0]));
        img
    }

    #[test]
    fn enclosed_white_regains_opacity_and_background_stays_clear() {
        let mut img = ringed();
        restore_enclosed(&mut img);
        assert_eq!(
            img.get_pixel(4, 4)[3],
            255,
            "the enclosed hole is part of the subject"
        );
        assert_eq!(img.get_pixel(0, 0)[3], 0);
        assert_eq!(img.get_pixel(8, 4)[3], 0);
        assert_eq!(img.get_pixel(2, 2)[3], 255);
    }

    #[test]
    fn soft_edge_pixels_touching_the_background_keep_their_alpha() {
        let mut img = ringed();
        img.put_pixel(1, 4, Rgba([240, 240, 240, 128]));
        restore_enclosed(&mut img);
        assert_eq!(img.get_pixel(1, 4)[3], 128);
    }

    #[test]
    fn thumbnail_fits_128_keeps_aspect_and_never_enlarges() {
        let wide = RgbaImage::new(512, 256);
        assert_eq!(thumbnail(&wide, THUMBNAIL_SIZE).dimensions(), (128, 64));
        let small = RgbaImage::new(64, 64);
        assert_eq!(thumbnail(&small, THUMBNAIL_SIZE).dimensions(), (64, 64));
        let tall = RgbaImage::new(100, 1000);
        assert_eq!(thumbnail(&tall, THUMBNAIL_SIZE).dimensions(), (13, 128));
    }

    #[test]
    fn png_round_trips_with_alpha() {
        let img = ringed();
        let png = encode_png(&img).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let back = image::load_from_memory(&png).unwrap().to_rgba8();
        assert_eq!(back, img);
    }

    #[test]
    fn uploads_are_checked_before_decoding() {
        let png = encode_png(&RgbaImage::from_pixel(4, 3, Rgba([1, 2, 3, 255]))).unwrap();
        let rgb = decode_image(&png, ImageLimits::default()).unwrap();
        assert_eq!(rgb.dimensions(), (4, 3));
        assert_eq!(rgb.get_pixel(0, 0).0, [1, 2, 3]);
        assert!(matches!(
            decode_image(b"hello, not an image", ImageLimits::default()),
            Err(ImageError::UnknownFormat)
        ));
        let tight = ImageLimits {
            max_bytes: 10,
            ..Default::default()
        };
        assert!(matches!(
            decode_image(&png, tight),
            Err(ImageError::TooManyBytes { .. })
        ));
        let small = ImageLimits {
            max_side: 3,
            ..Default::default()
        };
        assert!(matches!(
            decode_image(&png, small),
            Err(ImageError::TooLarge { .. })
        ));
        let truncated = &png[..png.len() / 2];
        assert!(decode_image(truncated, ImageLimits::default()).is_err());
    }
}
