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
    let format = image::guess_format(bytes).map_err(|_| "not a PNG or JPEG image".to_string())?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(format!("{format:?} images are not accepted (PNG or JPEG)"));
    }
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| format!("cannot decode image: {e}"))?;
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
        let cfg = ImageConfig { mean: vec![0.5], std: vec![0.5] };
        let v = decode(&png(56, 56, 255), 1, 28, 28, &cfg).unwrap();
        assert_eq!(v.len(), 784);
        assert!(v.iter().all(|&x| (x - 1.0).abs() < 1e-6));
        let rgb = decode(&png(28, 28, 0), 3, 28, 28, &ImageConfig { mean: vec![0.0; 3], std: vec![1.0; 3] })
            .unwrap();
        assert_eq!(rgb.len(), 3 * 784);
    }

    #[test]
    fn rejects_non_images() {
        let cfg = ImageConfig { mean: vec![0.0], std: vec![1.0] };
        assert!(decode(b"hello", 1, 28, 28, &cfg).unwrap_err().contains("PNG or JPEG"));
        let mut broken = png(8, 8, 1);
        broken.truncate(30);
        assert!(decode(&broken, 1, 28, 28, &cfg).is_err());
    }
}
