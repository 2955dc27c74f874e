//! Server-side image pre-processing for `BYTES` image inputs: decode PNG or JPEG, convert
//! to the model's channels, resize to its input size, scale to [0, 1] and normalise per
//! channel — as the model was trained.

use image::imageops::FilterType;

use crate::repository::ImageConfig;

/// Decodes one encoded image into `channels × height × width` normalised values, or says
/// why it cannot (for the error message of the input element `index`).
pub fn decode(
    bytes: &[u8],
    channels: usize,
    height: u32,
    width: u32,
    config: &ImageConfig,
) -> Result<Vec<f32>, String> {
    if bytes.len() > config.max_bytes {
        return Err(format!(
            "{} bytes of encoded image; this model accepts at most {} (input.image.max_bytes)",
            bytes.len(),
            config.max_bytes
        ));
    }
    let format = image::guess_format(bytes).map_err(|_| "not a PNG or JPEG image".to_string())?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(format!("{format:?} images are not accepted (PNG or JPEG)"));
    }
    // The header says how large the image is; refuse before a pixel is decoded.
    let reader = || image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let (w, h) = reader().into_dimensions().map_err(|e| format!("cannot read the image header: {e}"))?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > config.max_pixels {
        return Err(format!(
            "the image is {w}×{h} = {pixels} pixels; this model accepts at most {} (input.image.max_pixels)",
            config.max_pixels
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // Decoded pixels (at most 16 bits × 4 channels) plus the decoder's own buffers.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(1 << 20));
    let mut reader = reader();
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("cannot decode image: {e}"))?;
    let img = if img.width() != width || img.height() != height {
        img.resize_exact(width, height, FilterType::Triangle)
    } else {
        img
    };
    let pixels: Vec<u8> = match channels {
        1 => img.to_luma8().into_raw(),
        _ => img.to_rgb8().into_raw(),
    };
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
        let err = decode(&png(101, 100, 3), 1, 28, 28, &cfg).unwrap_err();
        assert!(err.contains("10100 pixels") && err.contains("max_pixels"), "{err}");
        cfg.max_bytes = 10;
        assert!(decode(&png(8, 8, 3), 1, 28, 28, &cfg).unwrap_err().contains("max_bytes"));
    }

    #[test]
    fn rejects_non_images() {
        let cfg = ImageConfig::new(vec![0.0], vec![1.0]);
        assert!(decode(b"hello", 1, 28, 28, &cfg).unwrap_err().contains("PNG or JPEG"));
        let mut broken = png(8, 8, 1);
        broken.truncate(30);
        assert!(decode(&broken, 1, 28, 28, &cfg).is_err());
    }
}
