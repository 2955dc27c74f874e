//! Server-side image pre-processing for `BYTES` image inputs: decode PNG or JPEG, convert
//! to the model's channels, resize to its input size, scale to [0, 1] and normalise per
//! channel — as the model was trained.

use crate::data::pixels::decode_pixels;
pub use crate::data::pixels::{ImageRefusal, in_guarded_decoder};
use crate::repository::ImageConfig;

/// Decodes one encoded image into `channels × height × width` normalised values, or says
/// why it cannot. Size limits are checked from the byte count and the header before a pixel
/// is decoded.
pub fn decode(
    bytes: &[u8],
    channels: usize,
    height: u32,
    width: u32,
    config: &ImageConfig,
) -> Result<Vec<f32>, ImageRefusal> {
    let pixels = decode_pixels(bytes, channels, height, width, config.max_bytes, config.max_pixels)?;
    let plane = (height * width) as usize;
    let mut out = vec![0f32; channels * plane];
    for (i, &p) in pixels.iter().enumerate() {
        let (pos, c) = (i / channels, i % channels);
        out[c * plane + pos] = ((p as f64 / 255.0 - config.mean[c]) / config.std[c]) as f32;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, value: u8) -> Vec<u8> {
        let img = image::GrayImage::from_pixel(w, h, image::Luma([value]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_resizes_and_normalises() {
        let cfg = ImageConfig::new(vec![0.5], vec![0.5]);
        let v = decode(&png(56, 56, 255), 1, 28, 28, &cfg).unwrap();
        assert_eq!(v.len(), 784);
        assert!(v.iter().all(|&x| (x - 1.0).abs() < 1e-6));
        let rgb = decode(&png(28, 28, 0), 3, 28, 28, &ImageConfig::new(vec![0.0; 3], vec![1.0; 3])).unwrap();
        assert_eq!(rgb.len(), 3 * 784);
    }

    #[test]
    fn refuses_large_images_before_decoding() {
        let mut cfg = ImageConfig::new(vec![0.0], vec![1.0]);
        cfg.max_pixels = 100 * 100;
        assert!(decode(&png(100, 100, 3), 1, 28, 28, &cfg).is_ok());
        let err = decode(&png(101, 100, 3), 1, 28, 28, &cfg).unwrap_err().to_string();
        assert!(err.contains("10100 pixels") && err.contains("max_pixels"), "{err}");
        cfg.max_bytes = 10;
        assert!(
            matches!(decode(&png(8, 8, 3), 1, 28, 28, &cfg), Err(ImageRefusal::TooLarge(m)) if m.contains("max_bytes"))
        );
    }

    /// Inputs on which the decoders panicked under fuzzing (fuzz/regressions/, RESULTS.md):
    /// each is answered as an image, or refused as invalid, never a panic.
    #[test]
    fn decoder_panics_are_refusals() {
        let cfg = ImageConfig::new(vec![0.5; 3], vec![0.5; 3]);
        // png 0.18.1 indexes past a palette whose length is not a multiple of 3 (a panic in
        // every build).
        let png = include_bytes!("../../fuzz/regressions/png-palette-length.png");
        match decode(png, 1, 28, 28, &cfg) {
            Err(ImageRefusal::Invalid(m)) => assert!(m.contains("decoder failed"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(!in_guarded_decoder(), "the mark ends with the decoder, panic or not");
        // zune-jpeg 0.5.15 multiplies a DC coefficient past i32 (a panic where overflow is
        // checked, as in test and fuzz builds; it wraps in release builds).
        let jpeg = include_bytes!("../../fuzz/regressions/jpeg-dc-overflow.jpg");
        for channels in [1, 3] {
            match decode(jpeg, channels, 28, 28, &cfg) {
                Ok(v) => assert!(v.len() == channels * 784 && v.iter().all(|x| x.is_finite())),
                Err(ImageRefusal::Invalid(m)) => assert!(m.starts_with("cannot decode image"), "{m}"),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn rejects_non_images() {
        let cfg = ImageConfig::new(vec![0.0], vec![1.0]);
        assert!(decode(b"hello", 1, 28, 28, &cfg).unwrap_err().to_string().contains("PNG or JPEG"));
        let mut broken = png(8, 8, 1);
        broken.truncate(30);
        assert!(decode(&broken, 1, 28, 28, &cfg).is_err());
    }
}
